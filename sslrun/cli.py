"""The ``sslrun`` command: Hydra composes the config, ``run`` does the work."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from .errors import SslrunError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    from .run import run  # imported here so `sslrun --help` does not pay for torch

    hc = HydraConfig.get()
    overridden = {o.split("=", 1)[0].split(".", 1)[0].lstrip("+~") for o in hc.overrides.task}
    console = Console()
    try:
        run(cfg, Path(hc.runtime.output_dir), overridden, console)
    except SslrunError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun error:[/] {e}", highlight=False)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
