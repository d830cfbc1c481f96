"""An AWD-LSTM language model trained with MaxUp over word-embedding dropout, as the MaxUp paper ran it.

The network is Merity, Keskar & Socher's AWD-LSTM ("Regularizing and Optimizing LSTM Language Models", ICLR 2018):
a multi-layer LSTM whose decoder shares the embedding matrix (weight tying, Press & Wolf 2017; Inan et al. 2017),
locked (variational) dropout on the embeddings, between layers and on the output (Gal & Ghahramani 2016), DropConnect
on the hidden-to-hidden weights ("weight drop", Wan et al. 2013), activation regularisation (AR, TAR), and
word-embedding dropout, here drawn by :class:`~lightning_maxup.augment.WordEmbeddingDropout` so that MaxUp can pick
each sequence's worst mask (Gong et al., "MaxUp", CVPR 2021, which used the ADV-AWD-LSTM code of Wang et al. 2019 with
``m = 2``). Training is stateful truncated back-propagation through time over the
:class:`~lightning_maxup.recipes.textdata.WordLanguageData` streams, with NT-ASGD: SGD until the validation loss has not
improved on the best of all but the last ``nonmono`` epochs, then averaged SGD (the iterates are averaged from then
on, and the average is what validation, testing and the trained model use).

**MaxUp and the carried hidden state.** Each row of a batch is one stream; the state the previous window left is
part of the batch (``batch["state"]``, one ``(h, c)`` pair ``[B, H]`` per layer), so MaxUp treats it like any other
per-sample tensor: the ``m`` copies of a row all start from that row's incoming state (they differ only by their
embedding-dropout masks), the selection pass's final states are discarded, and the state carried to the next window
is the final state of the gradient pass, i.e. of the copy that was trained. The carried state and the window
position are saved in checkpoints, and a resumed fit continues from them exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup._lightning import pl
from lightning_maxup.augment.text import WordEmbeddingDropout, embedding_scale
from lightning_maxup.core.config import MaxUpConfig, option_names
from lightning_maxup.training.mixin import MaxUpMixin

__all__ = ["AWDLSTM", "AWDLSTMLanguageModel", "LockedDropout", "State", "WeightDropLSTM", "nt_asgd_triggers"]

#: Per layer, the ``(h, c)`` pair ``[B, H]`` carried between windows.
State = list[tuple[Tensor, Tensor]]

_CHECKPOINT_KEY = "awd_lstm"


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared by all its time steps (Gal & Ghahramani, 2016).

    Args:
        p: Dropout probability.

    Example:
        >>> drop = LockedDropout(0.5).train()
        >>> out = drop(torch.ones(2, 5, 3))
        >>> bool((out == out[:, :1]).all())  # the same mask at every time step
        True
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Expected `p` to be a probability in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Drop ``x`` ``[B, T, H]`` with one mask per row."""
        if not self.training or self.p == 0:
            return x
        mask = torch.empty(x.shape[0], 1, x.shape[2], device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


class WeightDropLSTM(nn.Module):
    """One LSTM layer whose hidden-to-hidden weight is dropped (DropConnect) once per forward, in training.

    The raw weight stays the LSTM's parameter ``weight_hh_l0``; each training forward runs the layer with
    ``dropout(weight_hh_l0, p)`` in its place through :func:`torch.func.functional_call`, so the gradient reaches
    the raw weight and the fused LSTM kernels still apply.

    Args:
        input_size: Input features.
        hidden_size: Hidden units.
        p: Drop probability of the hidden-to-hidden weights.

    Example:
        >>> layer = WeightDropLSTM(3, 4, p=0.5)
        >>> out, (h, c) = layer(torch.zeros(2, 5, 3))
        >>> out.shape, h.shape
        (torch.Size([2, 5, 4]), torch.Size([2, 4]))
    """

    def __init__(self, input_size: int, hidden_size: int, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Expected `p` to be a probability in [0, 1), got {p!r}")
        self.p = p
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run ``x`` ``[B, T, I]`` from ``state`` (``(h, c)``, each ``[B, H]``); return the outputs and final state."""
        hx = None if state is None else (state[0][None].contiguous(), state[1][None].contiguous())
        if not self.training or self.p == 0:
            out, (h, c) = self.lstm(x, hx)
            return out, (h[0], c[0])
        weight = F.dropout(self.lstm.get_parameter("weight_hh_l0"), self.p, training=True)
        out, (h, c) = torch.func.functional_call(self.lstm, {"weight_hh_l0": weight}, (x, hx))
        return out, (h[0], c[0])


class AWDLSTM(nn.Module):
    """The AWD-LSTM network: embedding, ``layers`` weight-dropped LSTMs with locked dropout, tied decoder.

    Args:
        vocab_size: Number of words.
        emb_size: Embedding (and, with tying, last hidden) size.
        hidden_size: Hidden size of the inner layers.
        layers: Number of LSTM layers.
        dropout: Locked dropout on the last layer's output.
        dropout_hidden: Locked dropout between layers.
        dropout_input: Locked dropout on the embeddings.
        weight_drop: DropConnect probability of the hidden-to-hidden weights.
        tie_weights: Share the embedding matrix with the decoder (the last layer then has ``emb_size`` units).

    Example:
        >>> net = AWDLSTM(10, emb_size=4, hidden_size=6, layers=2)
        >>> logits, state, _ = net(torch.zeros(3, 5, dtype=torch.long))
        >>> logits.shape, [h.shape[1] for h, _ in state]
        (torch.Size([3, 5, 10]), [6, 4])
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1150,
        layers: int = 3,
        dropout: float = 0.4,
        dropout_hidden: float = 0.25,
        dropout_input: float = 0.4,
        weight_drop: float = 0.5,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"Expected `layers` to be a positive integer, got {layers!r}")
        self.embedding = nn.Embedding(vocab_size, emb_size)
        sizes = [emb_size] + [hidden_size] * (layers - 1) + [emb_size if tie_weights else hidden_size]
        self.rnns = nn.ModuleList(WeightDropLSTM(sizes[i], sizes[i + 1], weight_drop) for i in range(layers))
        self.drop_input = LockedDropout(dropout_input)
        self.drop_hidden = LockedDropout(dropout_hidden)
        self.drop_output = LockedDropout(dropout)
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.sizes = sizes

    def initial_state(self, batch_rows: int, device: torch.device | None = None) -> State:
        """Zero ``(h, c)`` for every layer."""
        return [
            (torch.zeros(batch_rows, h, device=device), torch.zeros(batch_rows, h, device=device))
            for h in self.sizes[1:]
        ]

    def forward(
        self, tokens: Tensor, state: State | None = None, scale: Tensor | None = None
    ) -> tuple[Tensor, State, tuple[Tensor, Tensor]]:
        """Logits ``[B, T, V]``, the final state, and the last layer's ``(raw, dropped)`` outputs (for AR/TAR).

        ``scale`` is the per-token embedding scale of :class:`~lightning_maxup.augment.WordEmbeddingDropout`.
        """
        x = self.embedding(tokens)
        if scale is not None:
            x = x * scale[..., None].to(x.dtype)
        x = self.drop_input(x)
        new_state: State = []
        raw = x
        for i, rnn in enumerate(self.rnns):
            raw, layer_state = rnn(x, None if state is None else state[i])
            new_state.append(layer_state)
            x = self.drop_hidden(raw) if i < len(self.rnns) - 1 else self.drop_output(raw)
        return self.decoder(x), new_state, (raw, x)


def nt_asgd_triggers(history: list[float], loss: float, nonmono: int) -> bool:
    """NT-ASGD's switch (Merity et al., 2018): ``loss`` is worse than the best of all but the last ``nonmono``.

    ``history`` holds the earlier validation losses; AWD-LSTM tests ``len(history) > nonmono and loss >
    min(history[:-nonmono])``.

    Example:
        >>> nt_asgd_triggers([5.0, 4.0, 3.0, 3.1, 3.2], 3.05, nonmono=2)  # worse than 3.0, two or more epochs ago
        True
        >>> nt_asgd_triggers([5.0, 4.0, 3.0, 2.9, 2.8], 2.85, nonmono=2)
        False
    """
    return len(history) > nonmono and loss > min(history[:-nonmono])


class AWDLSTMLanguageModel(MaxUpMixin, pl.LightningModule):
    """AWD-LSTM trained with MaxUp over word-embedding dropout, stateful truncated BPTT and NT-ASGD.

    Batches are ``(inputs, targets)`` windows ``[B, T]`` of ``B`` parallel streams
    (:class:`~lightning_maxup.recipes.textdata.WordLanguageData`); the module adds the carried state and MaxUp adds the
    embedding scale. The per-sample loss is the sequence's mean token cross-entropy plus AR and TAR. The learning
    rate of a window of length ``T`` is ``lr * T / bptt``, as AWD-LSTM scales it. Validation and test log
    ``val/loss``, ``val/ppl``, ``test/loss`` and ``test/ppl`` (token-weighted, with the state carried through the
    split) and ``nt_asgd/averaging`` (1 once averaging has started).

    Args:
        vocab_size: Number of words (linked from the data module in the CLI).
        emb_size: Embedding size.
        hidden_size: Hidden size of the inner LSTM layers.
        layers: LSTM layers.
        dropout: Locked dropout on the output.
        dropout_hidden: Locked dropout between layers.
        dropout_input: Locked dropout on the embeddings.
        weight_drop: DropConnect on the hidden-to-hidden weights.
        embedding_dropout: ``p`` of the word-embedding dropout (the MaxUp augmentation).
        lr: SGD learning rate.
        weight_decay: L2 penalty.
        alpha: Activation regularisation (AR) weight.
        beta: Temporal activation regularisation (TAR) weight.
        nonmono: NT-ASGD's non-monotone interval (epochs).
        bptt: The nominal window length, for the learning-rate scaling.
        maxup: The MaxUp options (:class:`~lightning_maxup.MaxUpConfig`, in YAML under ``model.init_args.maxup``)
            except ``augment``, which is ``WordEmbeddingDropout(embedding_dropout, vocab_size)``.
        **options: :class:`~lightning_maxup.MaxUpConfig` fields overriding ``maxup`` (``m=2``, ``seed``, ...).

    Example:
        >>> model = AWDLSTMLanguageModel(20, emb_size=8, hidden_size=8, layers=2, m=2)
        >>> model.maxup_m, type(model.maxup_augment).__name__
        (2, 'WordEmbeddingDropout')
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1150,
        layers: int = 3,
        dropout: float = 0.4,
        dropout_hidden: float = 0.25,
        dropout_input: float = 0.4,
        weight_drop: float = 0.5,
        embedding_dropout: float = 0.1,
        lr: float = 30.0,
        weight_decay: float = 1.2e-6,
        alpha: float = 2.0,
        beta: float = 1.0,
        nonmono: int = 5,
        bptt: int = 70,
        maxup: MaxUpConfig | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"Unknown AWDLSTMLanguageModel argument(s) {unknown}; MaxUp options are {option_names()}")
        if "augment" in options or (maxup is not None and maxup.augment is not None):
            raise ValueError(
                "AWDLSTMLanguageModel builds its augmentation, WordEmbeddingDropout(`embedding_dropout`, `vocab_size`);"
                " set `embedding_dropout` instead of `augment`"
            )
        augment = WordEmbeddingDropout(embedding_dropout, vocab_size) if embedding_dropout > 0 else None
        base = (maxup or MaxUpConfig()).replace(augment=augment)
        super().__init__(maxup=base, **options)
        self.save_hyperparameters(ignore=["maxup", *options])
        self.net = AWDLSTM(
            vocab_size, emb_size, hidden_size, layers, dropout, dropout_hidden, dropout_input, weight_drop
        )
        self.lr, self.weight_decay, self.alpha, self.beta = lr, weight_decay, alpha, beta
        self.nonmono, self.bptt = nonmono, bptt
        #: The state the last trained window left, carried into the next one (``None`` at an epoch's start).
        self.carried_state: State | None = None
        #: Windows trained in the current epoch (the position the carried state belongs to).
        self.windows_done = 0
        self._state_epoch = -1
        self._eval_state: State | None = None
        self._eval_sums: list[Tensor] = []
        self.val_history: list[float] = []
        self.averaging = False
        self._average: list[Tensor] | None = None
        self._average_count = 0
        self._swapped: list[Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------
    def per_sample_loss(self, batch: Any) -> Tensor:
        """Mean token cross-entropy of each stream's window, plus AR and TAR; keeps the trained copy's final state."""
        logits, state, (raw, dropped) = self.net(batch["tokens"], batch["state"], embedding_scale(batch))
        if not self.maxup_selecting:  # the gradient pass: the rows are the trained copies, in sample order
            self.carried_state = [(h.detach(), c.detach()) for h, c in state]
        loss = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none").mean(dim=1)
        if self.alpha:
            loss = loss + self.alpha * dropped.pow(2).mean(dim=(1, 2))
        if self.beta:
            loss = loss + self.beta * (raw[:, 1:] - raw[:, :-1]).pow(2).mean(dim=(1, 2))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One window: carry the state in, scale the learning rate by the window length, run the MaxUp step."""
        tokens, targets = batch[0], batch[1]
        epoch = int(self.trainer.current_epoch) if getattr(self, "_trainer", None) is not None else 0
        if epoch != self._state_epoch:  # a new epoch restarts the streams, as AWD-LSTM does
            self._state_epoch, self.carried_state, self.windows_done = epoch, None, 0
        state = self.carried_state or self.net.initial_state(tokens.shape[0], tokens.device)
        if getattr(self, "_trainer", None) is not None:
            for group in self.optimizers().param_groups:  # type: ignore[union-attr]
                group["lr"] = self.lr * tokens.shape[1] / self.bptt
        loss = self.maxup_step({"tokens": tokens, "targets": targets, "state": state}).loss
        self.windows_done += 1
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD; NT-ASGD's averaging is done by the module (see the class docstring)."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then fold the new iterate into the average once NT-ASGD has triggered (before any checkpoint)."""
        super().optimizer_step(*args, **kwargs)
        self._fold_average()

    def _fold_average(self) -> None:
        if not self.averaging:
            return
        params = [p.detach() for p in self.parameters()]
        if self._average is None:
            self._average, self._average_count = [p.clone() for p in params], 1
            return
        self._average_count += 1
        for avg, p in zip(self._average, params, strict=True):
            avg.add_(p - avg, alpha=1.0 / self._average_count)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation: stateful over the split, token-weighted; with the averaged weights once averaging
    # ------------------------------------------------------------------------------------------------------------
    def _eval_start(self) -> None:
        self._eval_state, self._eval_sums = None, []
        self._swap_in_average()

    def _eval_step(self, batch: Any) -> None:
        tokens, targets = batch[0], batch[1]
        state = self._eval_state or self.net.initial_state(tokens.shape[0], tokens.device)
        logits, new_state, _ = self.net(tokens, state)
        self._eval_state = new_state
        total = F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
        self._eval_sums.append(torch.stack([total, torch.full((), targets.numel(), device=total.device)]))

    def _eval_end(self, stage: str) -> float:
        totals = torch.stack(self._eval_sums).sum(0) if self._eval_sums else torch.ones(2)
        loss = float(totals[0] / totals[1])
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/ppl", math.exp(min(loss, 50.0)))
        self._swap_out_average()
        return loss

    def on_validation_epoch_start(self) -> None:
        """Reset the evaluation state; evaluate the averaged weights once averaging."""
        self._eval_start()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the summed cross-entropy of a window, carrying the state."""
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss`` and ``val/ppl``; trigger averaging on a non-monotone criterion (NT-ASGD)."""
        loss = self._eval_end("val")
        if getattr(self, "_trainer", None) is not None and self.trainer.sanity_checking:
            return
        if not self.averaging and nt_asgd_triggers(self.val_history, loss, self.nonmono):
            self.averaging = True
        self.val_history.append(loss)
        self.log("nt_asgd/averaging", float(self.averaging))

    def on_test_epoch_start(self) -> None:
        """Reset the evaluation state; test the averaged weights once averaging."""
        self._eval_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the summed cross-entropy of a window, carrying the state."""
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        """Log ``test/loss`` and ``test/ppl``."""
        self._eval_end("test")

    def on_train_end(self) -> None:
        """Leave the averaged weights in the model (what AWD-LSTM keeps), then run the mixin's checks."""
        if self._average is not None:
            with torch.no_grad():
                for p, avg in zip(self.parameters(), self._average, strict=True):
                    p.copy_(avg)
            self._average = None
            self.averaging = False
        super().on_train_end()

    def _swap_in_average(self) -> None:
        if self._average is None or self._swapped is not None:
            return
        with torch.no_grad():
            self._swapped = [p.detach().clone() for p in self.parameters()]
            for p, avg in zip(self.parameters(), self._average, strict=True):
                p.copy_(avg)

    def _swap_out_average(self) -> None:
        if self._swapped is None:
            return
        with torch.no_grad():
            for p, saved in zip(self.parameters(), self._swapped, strict=True):
                p.copy_(saved)
        self._swapped = None

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: the carried state, the window position and NT-ASGD's state
    # ------------------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the carried state with its position, and NT-ASGD's history and average."""
        checkpoint[_CHECKPOINT_KEY] = {
            "carried_state": self.carried_state,
            "windows_done": self.windows_done,
            "state_epoch": self._state_epoch,
            "val_history": list(self.val_history),
            "averaging": self.averaging,
            "average": self._average,
            "average_count": self._average_count,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` saved."""
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is not None:
            self.carried_state = saved["carried_state"]
            self.windows_done = int(saved["windows_done"])
            self._state_epoch = int(saved["state_epoch"])
            self.val_history = list(saved["val_history"])
            self.averaging = bool(saved["averaging"])
            self._average = saved["average"]
            self._average_count = int(saved["average_count"])
            trainer = getattr(self, "_trainer", None)
            resume_at = getattr(getattr(trainer, "datamodule", None), "resume_at", None)
            if callable(resume_at) and self.windows_done:  # continue the epoch after the windows already trained
                resume_at(self._state_epoch, self.windows_done)
        super().on_load_checkpoint(checkpoint)
