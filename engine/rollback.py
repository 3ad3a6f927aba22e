"""Bad steps, counted in one place: non-finite steps (skipped), loss spikes, and what the run does about them.

After every optimizer step BadSteps.judge gives one verdict: carry on, roll back, or stop (exit code 3).
- A step whose gradient norm is not finite was skipped (by train.py, or under float16 by the loss scaler). After
  max_nonfinite_steps of them in a row the run stops, with advice drawn from what it saw.
- A bad step is a non-finite one, or one whose loss exceeds spike_factor times the median of the last spike_window
  good steps' losses and that median by MIN_SPIKE_RISE nats (near a loss of 0, a batch at several times the median
  is noise, not a divergence). spike_patience bad steps in a row make a spike: the run rolls back to the newest good
  state (the newest checkpoint it saved or resumed, else its starting state, held in memory), with the learning rate
  scaled by spike_lr_scale and new data windows (the windows depend on the rollback count), as PaLM skipped the
  batches around a spike. After max_rollbacks rollbacks a spike stops the run. max_rollbacks=0 turns this off.
The spike detector's window and bad-step count are part of the loop state (engine/train_state.py), so a resumed run
judges as an uninterrupted one.
"""

import math
import statistics

from engine.checkpoint import checkpoint_losses
from engine.train_state import TrainState

MIN_SPIKE_RISE = 0.1  # nats above the median a spike's loss rises at least

CARRY_ON, ROLL_BACK, STOP = "carry on", "roll back", "stop"


class BadSteps:
    """The watch on bad steps of the run whose state is `state`. resume_from: the checkpoint it resumed, the first
    place a spike rolls back to; for a new run, its starting state (held in memory, only with rollbacks on)."""

    def __init__(
        self,
        state: TrainState,
        resume_from: str | None,
        max_nonfinite_steps: int,
        max_rollbacks: int,
        spike_factor: float,
        spike_window: int,
        spike_patience: int,
        spike_lr_scale: float,
        float16: bool,
        grad_clip: float,
        learning_rate: float,
    ):
        self.max_nonfinite_steps, self.max_rollbacks = max_nonfinite_steps, max_rollbacks
        self.spike_factor, self.spike_window, self.spike_patience = spike_factor, spike_window, spike_patience
        self.spike_lr_scale, self.log = spike_lr_scale, state.rt.print0
        self.float16, self.grad_clip, self.learning_rate = float16, grad_clip, learning_rate  # for the advice
        self.in_a_row = 0  # non-finite steps in a row
        self.good_steps = 0  # finite steps this process has run
        self.good = resume_from  # the newest checkpoint a spike rolls back to
        self.start = state.snapshot() if max_rollbacks and not resume_from else None  # else here (a state_dict)
        self.loss_finite = True  # whether the last step's loss was finite (for the advice)
        self.stop_line = ""  # why the run stops, after a STOP

    def judge(self, state: TrainState, loss: float, finite: bool, empty: bool) -> str:
        """The verdict on the step just taken (state.loop.iter_num counts it already): CARRY_ON, ROLL_BACK or STOP
        (then stop_line says why). finite: its gradient norm was; empty: its batch had nothing to learn (chat)."""
        loop = state.loop
        self.loss_finite = math.isfinite(loss)
        if finite:
            self.good_steps, self.in_a_row = self.good_steps + 1, 0
        else:  # skipped, by us or by the scaler: counted either way, so a run of NaN weights stops
            self.in_a_row += 1
            loop.skipped_steps += 1
            self.log(f"iter {loop.iter_num - 1}: non-finite gradient norm, step skipped ({self.in_a_row} in a row)")
        if self.max_rollbacks and not empty and self.spiked(state, loss, finite):
            if loop.rollbacks < self.max_rollbacks:
                return ROLL_BACK
            self.stop_line = f"stopping: a loss spike after {loop.rollbacks} rollbacks; the last good one: {self.good}"
            return STOP
        if self.in_a_row >= self.max_nonfinite_steps > 0:
            self.stop_line = (
                f"stopping: {self.in_a_row} non-finite steps in a row at iteration {loop.iter_num}; {self.advice()} "
                "The last good checkpoint is kept."
            )
            return STOP
        return CARRY_ON

    def spiked(self, state: TrainState, loss: float, finite: bool) -> bool:
        """Whether this step ends a loss spike: spike_patience bad steps in a row. Good losses join the window; bad
        ones do not, so a divergence cannot become its own reference."""
        loop = state.loop
        reference = statistics.median(loop.recent_losses) if loop.recent_losses else math.inf
        if finite and math.isfinite(loss) and loss <= max(self.spike_factor * reference, reference + MIN_SPIKE_RISE):
            loop.recent_losses = (loop.recent_losses + [loss])[-self.spike_window :]
            loop.bad_steps = 0
            return False
        loop.bad_steps += 1
        return loop.bad_steps >= self.spike_patience

    def roll_back(self, state: TrainState, loss: float, log) -> None:
        """Restore the newest good state (weights, optimizers, scaler, average, counters); it goes on with one more
        rollback (so other data windows) and the learning rate scaled once more. A checkpoint's is saved again at once
        (ckpt-<iter>-r<n>), so a crash resumes it, not the spike. log: the run log, for the rollback's record."""
        before = state.loop
        if self.good:
            state.roll_back_to(self.good)
        else:
            state.restore(self.start)
        loop = state.loop
        loop.rollbacks, loop.lr_scale = before.rollbacks + 1, before.lr_scale * self.spike_lr_scale
        loop.skipped_steps, loop.recent_losses, loop.bad_steps = before.skipped_steps, [], 0
        record = {"iter": before.iter_num - 1, "rollback": loop.rollbacks, "of": self.max_rollbacks}
        record |= {"spike_loss": loss, "to": self.good or "the start of this run", "to_iter": loop.iter_num}
        log(record | {"lr_scale": loop.lr_scale})
        if self.good:  # with its evaluation's losses; the new checkpoint is the one to roll back to next
            losses = checkpoint_losses(self.good) if state.rt.master else None
            self.good = state.save(losses) or self.good

    def advice(self) -> str:
        """What most likely made every step non-finite, from what the run saw (not always the learning rate)."""
        if self.float16:
            return "float16 overflowed even with loss scaling: train in --dtype=bfloat16 (or float32)."
        if self.good_steps == 0:
            return (
                "not one step of this run was finite, so the data or the model (or the checkpoint it resumed) is the "
                "likely cause, not the schedule: check them with tools/evaluate.py."
            )
        if self.loss_finite:
            return (
                f"the loss is finite but its gradients overflow: set --grad_clip (now {self.grad_clip}) or lower "
                "--learning_rate."
            )
        return (
            "the weights diverged (the loss is not finite either): lower --learning_rate "
            f"(now {self.learning_rate:g}) or warm up longer."
        )
