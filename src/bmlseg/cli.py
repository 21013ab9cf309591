"""Console scripts. Each reads its configuration and calls the library; nothing else lives here.

Hydra apps (configs in ``conf/``, shipped as ``bmlseg.conf``; schemas in bmlseg.config):
bmlseg-synth, bmlseg-labels, bmlseg-train, bmlseg-eval, bmlseg-predict. Plain argparse tools:
bmlseg-check and bmlseg-report. The library is imported inside each command so that a command
loads only what it uses (torch takes seconds to import).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bmlseg.config import register_configs

CONFIG_PATH = "pkg://bmlseg.conf"
VERSION_BASE = "1.3"

register_configs()


def check_main() -> int:
    """bmlseg-check ROOT: validate a dataset folder."""
    from bmlseg.data.format import main_check

    return main_check(sys.argv[1:])


def report_main() -> int:
    """bmlseg-report DIR: Table-I style report of every summary.json below DIR."""
    from bmlseg.report import main_report

    # The table prints "mean ± std": on a terminal whose encoding lacks "±", print "?" instead.
    sys.stdout.reconfigure(errors="replace")
    return main_report(sys.argv[1:])


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="synth")
def synth_main(cfg: DictConfig) -> None:
    from bmlseg.data.synthetic import generate

    generate(
        cfg.root,
        n_subjects=cfg.n_subjects,
        seed=cfg.seed,
        preset=cfg.preset,
        noise=cfg.noise,
        preview=cfg.preview,
    )
    print(f"wrote a synthetic dataset of {cfg.n_subjects} subjects to {cfg.root}")


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="labels")
def labels_main(cfg: DictConfig) -> None:
    from bmlseg import labels
    from bmlseg.data.instances import InstanceOptions
    from bmlseg.labels.quality import markdown_table

    root, method = cfg.data.root, cfg.labels.method
    options = OmegaConf.to_container(cfg.labels.options, resolve=True)
    paths = labels.generate(root, method, overwrite=cfg.overwrite, **options)
    print(f"{len(paths)} {method} label volumes in {Path(root) / 'softlabels' / method}")
    if cfg.evaluate:
        # Every method, side by side (missing ones are made with their default options).
        out_dir = cfg.out_dir or Path(root) / "label_quality"
        instances = InstanceOptions(**cfg.data.instances)
        rows = labels.evaluate(root, list(labels.METHODS), out_dir=out_dir, instances=instances)
        print(markdown_table(rows), end="")
        print(f"wrote {Path(out_dir) / 'label_quality.md'}")


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="train")
def train_main(cfg: DictConfig) -> float:
    """Returns the best validation metric, which a Hydra sweeper (e.g. Optuna) maximizes."""
    from bmlseg.engine.train import train

    return train(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="evaluate")
def eval_main(cfg: DictConfig) -> None:
    from bmlseg.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        cfg.checkpoint,
        HydraConfig.get().runtime.output_dir,
        root=cfg.data.root,
        split=cfg.split,
        device=cfg.device,
        batch_size=cfg.batch_size,
        score_threshold=cfg.score_threshold,
        mask_threshold=cfg.mask_threshold,
        max_cases=cfg.max_cases,
        preview_slices=cfg.preview_slices,
    )


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    from bmlseg.predict import predict_file

    predict_file(
        cfg.checkpoint,
        cfg.input,
        cfg.bones,
        cfg.output_dir,
        device=cfg.device,
        batch_size=cfg.batch_size,
        score_threshold=cfg.score_threshold,
        mask_threshold=cfg.mask_threshold,
    )
