"""A ``jax.profiler`` trace over chosen training steps (a stage's ``profile: {start_step, num_steps}``).

The trace lands where TensorBoard's Profile tab reads it: ``<stage>/tensorboard/plugins/profile/
<run>/<host>.xplane.pb`` (``tensorboard --logdir <stage>/tensorboard`` with the
``tensorboard-plugin-profile`` package, or XProf). Steps count from 1, as in metrics.jsonl; a step is
in the trace from its dispatch to its metrics on the host, so the next batch's loading, which
overlaps it, is in as well. Every process traces its own host.
"""

from __future__ import annotations

from pathlib import Path

import jax

from unime_jax.training.sections import ProfileSection

__all__ = ["StepTrace"]


class StepTrace:
    """Starts the trace before step ``start_step`` and stops it after step ``start_step + num_steps - 1``.

    A run resumed inside the window traces the rest of it; one resumed after it traces nothing.
    """

    def __init__(self, section: ProfileSection | None, log_dir: Path) -> None:
        self._window = (
            None if section is None else (section.start_step, section.start_step + section.num_steps - 1)
        )
        self._log_dir = Path(log_dir)
        self._active = False

    def before(self, step: int) -> None:
        """Call before dispatching step ``step`` (from 1)."""
        if self._window is not None and not self._active and self._window[0] <= step <= self._window[1]:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._log_dir))
            self._active = True

    def after(self, step: int) -> None:
        """Call once step ``step``'s results are on the host."""
        if self._active and step >= self._window[1]:
            self.close()

    def close(self) -> None:
        """Stop a trace still running (a run that ended inside the window)."""
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            self._window = None  # one trace per run
