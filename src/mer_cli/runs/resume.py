"""Whether a run directory is continued: never train over a run by accident, never resume one
with other settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from mer_cli.core.errors import ConfigError
from mer_cli.runs import identity

log = logging.getLogger(__name__)


def check_resumable(cfg: DictConfig, out_dir: Path, resume: bool | str) -> bool:
    """Whether to continue the run in ``out_dir``; refuse to overwrite a run by accident, or to
    resume one with other settings. ``resume="auto"``: continue when ``out_dir`` holds a run (a
    requeued or relaunched job), which must then have the same settings; else start fresh."""
    # never train over a finished or interrupted run: its weights would be silently replaced
    started = any(out_dir.rglob("last.pt")) or any(out_dir.rglob("checkpoint.pt"))
    asked = {True: "true", False: "false"}.get(resume) if isinstance(resume, bool) else resume
    if asked not in ("true", "false", "auto"):
        raise ConfigError(f"resume={resume!r}: valid: true, false, auto")
    if asked == "false" or (asked == "auto" and not started):
        if started:
            raise ConfigError(
                f"{out_dir} already holds a run (last.pt): add resume=true to continue it "
                "(resume=auto: continue a run where there is one), or choose another hydra.run.dir"
            )
        return False
    old_path = out_dir / "config.yaml"
    if not old_path.is_file():
        raise ConfigError(f"resume={asked}: {out_dir} holds no run to resume (no config.yaml)")
    # run-time knobs (threads, device, progress bar, ...) may change; nothing that is learned
    old = identity.run_identity(cast(dict, OmegaConf.to_container(OmegaConf.load(old_path))))
    new = identity.run_identity(cast(dict, OmegaConf.to_container(cfg, resolve=True)))
    changed = identity.differences(old, new)
    if changed:
        shown = ", ".join(changed[:3])
        raise ConfigError(
            f"resume={asked}: the settings differ from the run in {out_dir} ({shown}); "
            "resume with the same overrides"
        )
    return True
