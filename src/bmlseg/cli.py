"""Console scripts. Each reads its configuration and calls the library; nothing else lives here.

Hydra apps (configs in ``conf/``, shipped as ``bmlseg.conf``; schemas in bmlseg.config):
bmlseg-synth, bmlseg-labels, bmlseg-train, bmlseg-eval. Plain argparse tools: bmlseg-check,
bmlseg-report and bmlseg-predict (which takes files and folders, as nnU-Net's and
TotalSegmentator's predictors do). The library is imported inside each command so that a command
loads only what it uses (torch takes seconds to import).

Bad input (a ValueError or an OSError: a broken file, a refused folder, a wrong setting; or a
required setting left out) ends a Hydra app with ``<tool>: error: <message>`` and exit status 1,
without a traceback; set HYDRA_FULL_ERROR=1 to see it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from bmlseg.config import register_configs

CONFIG_PATH = "pkg://bmlseg.conf"
VERSION_BASE = "1.3"

register_configs()


@contextlib.contextmanager
def _warnings_as_lines(tool: str) -> Iterator[None]:
    """Show warnings as ``<tool>: warning: <message>``: what a user acts on is the message, not
    the line of bmlseg that noticed it."""
    with warnings.catch_warnings():

        def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
            print(f"{tool}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _fail(tool: str, error: Exception) -> NoReturn:
    print(f"{tool}: error: {error}", file=sys.stderr)
    raise SystemExit(1) from None


def _reported(tool: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[DictConfig], Any]]:
    """Make a Hydra app end with its error's message, not a traceback, on bad input."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(task)
        def reported(cfg: DictConfig) -> Any:
            try:
                with _warnings_as_lines(tool):
                    return task(cfg)
            except (ValueError, OSError, MissingMandatoryValue) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if isinstance(error, MissingMandatoryValue):
                    _fail(tool, f"{error.full_key} is required: pass {error.full_key}=...")
                _fail(tool, error)

        return reported

    return decorate


class RunFolderGuard(Callback):
    """bmlseg-train's check of its run folder (bmlseg.engine.train.refuse_earlier_run), made
    before Hydra writes the run's ``.hydra/`` into it, so a refused run changes nothing there.

    Registered in train.yaml under ``hydra.callbacks``; a multirun checks every job folder
    already in its sweep folder.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check([Path(config.hydra.run.dir)], config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        self._check(sorted(sweep.iterdir()) if sweep.is_dir() else [], config)

    @staticmethod
    def _check(folders: list[Path], config: DictConfig) -> None:
        from bmlseg.engine.train import refuse_earlier_run

        try:
            for folder in folders:
                refuse_earlier_run(folder, config.train)
        except (ValueError, OSError) as error:
            _fail("bmlseg-train", error)


def check_main() -> int:
    """bmlseg-check ROOT: validate a dataset folder."""
    from bmlseg.data.format import main_check

    return main_check(sys.argv[1:])


def predict_main(argv: Sequence[str] | None = None) -> int:
    """bmlseg-predict -i INPUT -o OUT -c CHECKPOINT --bones B: BML maps and volumes of scans."""
    from bmlseg.predict import main_predict

    with _warnings_as_lines("bmlseg-predict"):
        return main_predict(sys.argv[1:] if argv is None else argv)


def report_main() -> int:
    """bmlseg-report DIR: Table-I style report of every summary.json below DIR."""
    from bmlseg.report import main_report

    # The table prints "mean ± std": on a terminal whose encoding lacks "±", print "?" instead.
    sys.stdout.reconfigure(errors="replace")
    return main_report(sys.argv[1:])


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="synth")
@_reported("bmlseg-synth")
def synth_main(cfg: DictConfig) -> None:
    from bmlseg.data.synthetic import generate

    generate(
        cfg.root,
        n_subjects=cfg.n_subjects,
        seed=cfg.seed,
        preset=cfg.preset,
        noise=cfg.noise,
        preview=cfg.preview,
        overwrite=cfg.overwrite,
    )
    print(f"wrote a synthetic dataset of {cfg.n_subjects} subjects to {cfg.root}")


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="labels")
@_reported("bmlseg-labels")
def labels_main(cfg: DictConfig) -> None:
    from bmlseg import labels
    from bmlseg.data.instances import InstanceOptions
    from bmlseg.labels.files import LabelOptionsError
    from bmlseg.labels.quality import markdown_table

    root, method = cfg.data.root, cfg.labels.method
    options = OmegaConf.to_container(cfg.labels.options, resolve=True)
    try:
        paths = labels.generate(root, method, overwrite=cfg.overwrite, **options)
    except LabelOptionsError as error:
        raise error.with_remedy("add overwrite=true to this command to remake them") from None
    print(f"{len(paths)} {method} label volumes in {Path(root) / 'softlabels' / method}")
    if cfg.evaluate:
        # Every method, side by side (missing ones are made with their default options).
        out_dir = cfg.out_dir or Path(root) / "label_quality"
        instances = InstanceOptions(**cfg.data.instances)
        rows = labels.evaluate(root, list(labels.METHODS), out_dir=out_dir, instances=instances)
        print(markdown_table(rows), end="")
        print(f"wrote {Path(out_dir) / 'label_quality.md'}")


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="train")
@_reported("bmlseg-train")
def train_main(cfg: DictConfig) -> float:
    """Returns the best validation metric, which a Hydra sweeper (e.g. Optuna) maximizes."""
    from bmlseg.engine.train import train

    return train(cfg, HydraConfig.get().runtime.output_dir)


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="evaluate")
@_reported("bmlseg-eval")
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
