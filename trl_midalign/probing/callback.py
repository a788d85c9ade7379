"""[`LayerProbeCallback`]: per-layer alignment probing during training, logged with the trainer's own log lines."""

import os
import time

from transformers import TrainerCallback

from ..losses import POOLINGS, PoolingMode
from .plots import pyplot
from .probe import MEAN, ProbeResult, group_pairs, probe_groups


class LayerProbeCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that probes per-layer alignment on a fixed held-out pair set during training.

    It probes after every evaluation, or every `every_n_steps` optimizer steps when that is set. Every rank runs
    the probe (under DeepSpeed ZeRO-3 all ranks must take part in each forward); the main process saves
    `probe.json` and the plots into `{output_dir}/layer_probe/step-{global_step}/`. The scores reach every
    reporting integration (TensorBoard, W&B, ...) and `trainer.state.log_history` as

    - `probe/retrieval_layer_{L}`: mean retrieval accuracy over the languages at layer `L` (every layer, or `layers`);
    - `probe/retrieval_{language}`: the accuracy of each language at the trainer's `align_layer`, when the trainer has
      one (as [`AlignmentTrainer`] does);
    - `probe/runtime`: seconds this probe took on this rank, saving included (like `eval_runtime`).

    How they are logged, without touching the trainer's own log lines: after an evaluation, with `trainer.log` as a
    separate entry at the same step (the step's training and evaluation lines are logged by then). Every
    `every_n_steps`, they are added in `on_log` to the trainer's next training log line, through the public
    `logs` dict and `state.log_history` (transformers appends a copy of the line to `log_history` before the
    callbacks' `on_log` runs); scores measured after the last training line join the summary line that ends
    training. So that the reporting integrations receive them too, the callback moves itself to
    the front of `trainer.callback_handler.callbacks` when training begins. For the scores to appear at the step
    they were measured, make `every_n_steps` a multiple of `logging_steps`.

    Args:
        pairs (`datasets.Dataset` or `list[dict]`):
            Held-out parallel pairs, as for [`probe_layers`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`, *optional*, defaults to `None`):
            Tokenizer; the trainer's `processing_class` when `None`.
        every_n_steps (`int` or `None`, *optional*, defaults to `None`):
            Probe every this many optimizer steps instead of after each evaluation.
        layers (`list[int]` or `None`, *optional*, defaults to `None`):
            Layers to log `probe/retrieval_layer_{L}` for; all layers when `None` (all layers are probed anyway,
            and saved in `probe.json`).
        trainer ([`~transformers.Trainer`] or `None`, *optional*, defaults to `None`):
            The trainer, needed to log. Can also be given later with [`~LayerProbeCallback.set_trainer`].
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass.
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per sentence.
        pooling (`str` or `None`, *optional*, defaults to `None`):
            `"mean"`, `"mean_no_special"` or `"last"`; `None` pools as the trainer's `args.align_pooling` (the
            pooling the alignment loss trains), or `"mean"` for a trainer without one.
        languages (`list[str]` or `None`, *optional*, defaults to `None`):
            Languages of `pairs` to probe; all when `None`.
        max_pairs_per_language (`int` or `None`, *optional*, defaults to `None`):
            Probe only the first this many pairs of each language.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column with the source sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column with the target sentence.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column with the language of each pair.
        save_plots (`bool`, *optional*, defaults to `True`):
            Save the heatmap and curve PNGs next to `probe.json` (needs matplotlib).

    Example:

    ```python
    >>> trainer = AlignmentTrainer(model=model, args=config, train_dataset=train, eval_dataset=dev)
    >>> trainer.add_callback(LayerProbeCallback(held_out_pairs, trainer=trainer, every_n_steps=50))
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        pairs,
        tokenizer=None,
        every_n_steps: int | None = None,
        layers: list[int] | None = None,
        *,
        trainer=None,
        batch_size: int = 32,
        max_length: int = 128,
        pooling: PoolingMode | None = None,
        languages: list[str] | None = None,
        max_pairs_per_language: int | None = None,
        source_column: str = "parallel_source",
        target_column: str = "parallel_target",
        language_column: str = "language",
        save_plots: bool = True,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be a positive int, or None to probe at evaluation.")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}.")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)} or None.")
        if save_plots:
            pyplot()  # fail at construction rather than in the middle of training
        self.groups = group_pairs(
            pairs,
            source_column=source_column,
            target_column=target_column,
            language_column=language_column,
            languages=languages,
            max_pairs_per_language=max_pairs_per_language,
        )
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.trainer = trainer
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling
        self.save_plots = save_plots
        self.history: list[tuple[int, ProbeResult]] = []  # (global_step, result) of every probe, on every rank
        self._last_probed_step: int | None = None
        self._pending: dict[str, float] = {}  # scores waiting for the next training log line

    def set_trainer(self, trainer) -> None:
        """
        Give the callback the trainer it logs through.

        Args:
            trainer ([`~transformers.Trainer`]):
                The trainer this callback is added to.
        """
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_trainer()  # fail before the first training step rather than at the first probe
        # Run `on_log` before the reporting integrations, so that they receive the scores added to a line. Moving
        # this callback from its position to the front leaves every callback after it where it was, so the handler's
        # loop over the list, which is calling this method, goes on with the right one.
        callbacks = self.trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
            callbacks.insert(0, self)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            logs = self._probe(args, state, kwargs)
            if logs is not None:
                self._pending.update(logs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or any(key.startswith("eval_") for key in logs):
            return
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and all(key in entry for key in logs):
            entry.update(self._pending)  # `Trainer.log` appended a copy of `logs` before calling the callbacks
        logs.update(self._pending)  # what the callbacks after this one, the reporting integrations, receive
        self._pending = {}

    def on_evaluate(self, args, state, control, **kwargs):
        if self.every_n_steps is not None:
            return
        logs = self._probe(args, state, kwargs)
        if logs is not None:
            # The evaluation metrics are already logged when `on_evaluate` runs, and the step's training line before
            # them, so a separate entry at the same step loses nothing.
            self.trainer.log(logs)

    def _check_trainer(self) -> None:
        if self.trainer is None:
            raise ValueError(
                "LayerProbeCallback needs the trainer to log through: create it with "
                "LayerProbeCallback(pairs, trainer=trainer) and add it with trainer.add_callback(...), or call "
                "callback.set_trainer(trainer) before training."
            )

    def _probe(self, args, state, kwargs) -> dict[str, float] | None:
        if self._last_probed_step == state.global_step:
            return None  # for example evaluate() called twice at the same step
        self._check_trainer()
        model = getattr(self.trainer, "model", None)
        if model is None:
            model = kwargs.get("model")
        tokenizer = self.tokenizer
        if tokenizer is None:
            processing_class = kwargs.get("processing_class") or getattr(self.trainer, "processing_class", None)
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise ValueError("LayerProbeCallback has no tokenizer: pass tokenizer=..., or give the trainer one.")
        pooling = self.pooling or getattr(args, "align_pooling", "mean")
        start = time.perf_counter()
        result = probe_groups(
            model,
            tokenizer,
            self.groups,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pooling=pooling,
            show_progress=False,
        )
        self._last_probed_step = state.global_step
        self.history.append((state.global_step, result))

        layers = result.layers if self.layers is None else self.layers
        outside = [layer for layer in layers if layer not in result.layers]
        if outside:
            raise ValueError(
                f"LayerProbeCallback(layers={self.layers}): {outside} are outside the model, whose layers are "
                f"0..{result.layers[-1]}."
            )
        mean = result.retrieval_accuracy[MEAN]
        logs = {f"probe/retrieval_layer_{layer}": mean[result.layers.index(layer)] for layer in layers}
        align_layer = getattr(self.trainer, "align_layer", None)
        if isinstance(align_layer, int) and align_layer in result.layers:
            position = result.layers.index(align_layer)
            for language in result.languages:
                logs[f"probe/retrieval_{language}"] = result.retrieval_accuracy[language][position]

        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, "layer_probe", f"step-{state.global_step}")
            result.to_json(os.path.join(directory, "probe.json"))
            if self.save_plots:
                result.plot(directory)
        logs["probe/runtime"] = round(time.perf_counter() - start, 4)
        return logs
