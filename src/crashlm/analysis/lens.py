"""Layer lenses: what each layer's residual state would predict as the next token.

The **logit lens** decodes every residual state the way the model decodes its last one:
final norm, then unembedding (:func:`crashlm.core.models.hidden_to_logits`; the original CRaSh code
skipped the norm, which makes early layers look far worse than they are). The **tuned lens**
(Belrose et al. 2023) first maps each state through a learned affine translator, trained so
the decoded distribution matches the model's final one.

States are numbered like :func:`crashlm.core.models.capture_layer_io`: S = L + 1 states, index 0 is
the embedding output and index l the output of decoder layer l. For an emulator, the layers are
its positions, and each state has a **depth** in the full model (:func:`emulator_depth`): the
full-model layer whose output it stands for. A :class:`TunedLens` has L translators, one per
full-model state 0..L-1, and an emulator's state is translated by the translator of its depth.
The last state is the model's own output and is decoded as is (identity translator), so at the
last layer every lens equals the model's logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crashlm.core.errors import UsageError
from crashlm.core.io import (
    atomic_dir,
    dataclass_fields,
    load_tensors,
    read_artifact_meta,
    save_tensors,
    write_json,
)
from crashlm.core.models import capture_layer_io, get_layers, hidden_to_logits
from crashlm.core.scoring import IGNORE_INDEX, encode_text, next_token_targets, pad_batch, pad_token_id

LENS_KINDS = ("logit", "tuned")
LENS_FORMAT = "crashlm-tuned-lens"
LENS_VERSION = 1
LENS_WEIGHTS = "lens.safetensors"
LENS_META = "lens.json"


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def full_depth(model: nn.Module) -> list[int]:
    """The depths of a full model's states: 0 (embeddings) .. L."""
    return list(range(len(get_layers(model)) + 1))


def emulator_depth(emulator) -> list[int]:
    """Each emulator state's depth in the full model, from its slots.

    State 0 is the embeddings. Without sharing, position i holds kept layer ``source`` and the
    layers in between are gone, so its output stands for the full model's layer ``source``
    output (depth source + 1). With sharing the emulator keeps all L positions, each standing
    in for its own layer (depth position + 1) with another layer's weights. An emulator with L
    positions is read as sharing: when every layer is kept, the two rules agree. Only the
    emulator's ``slots`` and ``plan`` are read (analysis sits below the emulators layer).
    """
    slots = emulator.slots
    shares = len(slots) == emulator.plan.num_layers
    return [0, *((slot.position if shares else slot.source) + 1 for slot in slots)]


def check_depth(model: nn.Module, depth: Sequence[int] | None) -> list[int]:
    """``depth`` (default: the full model's), checked: one non-decreasing entry per state, from 0."""
    if depth is None:
        return full_depth(model)
    depth = [int(d) for d in depth]
    states = len(get_layers(model)) + 1
    if len(depth) != states or depth[0] != 0 or any(b < a for a, b in zip(depth, depth[1:])):
        raise UsageError(f"depth must give {states} non-decreasing full-model depths starting at 0, got {depth}")
    return depth


# ---------------------------------------------------------------------------------------------
# Residual states of real tokens


@dataclass
class TokenStates:
    """The residual states of one batch's real (non-pad) tokens, flattened over the batch.

    ``states`` is [S, N, D] for the N real tokens; ``targets[n]`` is the id of the token that
    follows token n in its text, or ``IGNORE_INDEX`` for the last token of a text.
    """

    states: torch.Tensor
    targets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.states.shape[1]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int = 512) -> dict[str, torch.Tensor]:
    """``texts`` as one right-padded batch: positions never depend on the padding side."""
    return pad_batch([encode_text(tokenizer, text, max_length) for text in texts], pad_token_id(tokenizer))


@torch.no_grad()
def batch_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenStates:
    """Run ``model`` on an :func:`encode_texts` batch and keep the S residual states of every real token.

    The base model is called without its LM head: vocabulary logits of every token would cost
    more memory than the states, and the lenses decode only what they need, chunk by chunk.
    """
    device = _model_device(model)
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    base = getattr(model, "base_model", model)
    with capture_layer_io(model) as states:
        base(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
    # Next-token targets; a token with no real successor (end of text, or padding next) has none.
    targets = next_token_targets(input_ids, mask)
    return TokenStates(torch.stack([state[mask] for state in states]), targets[mask])


def token_states(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 512) -> TokenStates:
    """:func:`batch_states` of ``texts``, each truncated to ``max_length`` tokens."""
    return batch_states(model, encode_texts(tokenizer, texts, max_length))


def iter_token_states(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
    desc: str = "layer states",
) -> Iterator[TokenStates]:
    """:func:`token_states` batch by batch, with a progress bar: one batch's states alive at a time."""
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        yield token_states(model, tokenizer, texts[start : start + batch_size], max_length)


# ---------------------------------------------------------------------------------------------
# Tuned lens


class TunedLens(nn.Module):
    """One affine translator per layer, applied in residual form: ``h + A h + b``.

    A and b start at zero, so an untrained tuned lens is exactly the logit lens. There are L
    translators for the states 0..L-1 (embeddings and layers 1..L-1); the last state L is the
    model's own output and is decoded as is. ``model``, ``base_fingerprint`` and ``training``
    are provenance, saved with the weights.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        model: str | None = None,
        base_fingerprint: str | None = None,
        training: dict | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"a tuned lens needs num_layers >= 1 and hidden_size >= 1, got {num_layers}, {hidden_size}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.model = model
        self.base_fingerprint = base_fingerprint
        self.training_config = dict(training or {})
        self.translators = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)

    @classmethod
    def for_model(cls, model: nn.Module, name: str | None = None, base_fingerprint: str | None = None) -> "TunedLens":
        """A zero (logit-lens-equivalent) lens shaped for ``model``'s layers and residual width."""
        lens = cls(len(get_layers(model)), model.config.hidden_size, name, base_fingerprint)
        return lens.to(_model_device(model))

    def check_model(self, model: nn.Module, depth: Sequence[int] | None = None) -> None:
        """Refuse a model whose residual width or depth does not fit this lens.

        A full model must have exactly the lens's layer count; an emulator (``depth`` given) must
        stay within it, since each of its states uses the translator of its full-model depth.
        """
        layers, width = len(get_layers(model)), model.config.hidden_size
        deepest = max(depth) if depth is not None else layers
        if width != self.hidden_size or (depth is None and layers != self.num_layers) or deepest > self.num_layers:
            raise UsageError(
                f"the tuned lens was trained for {self.num_layers} layers of width {self.hidden_size}, "
                f"this model has {layers} layers of width {width}"
                + (f" standing for depths up to {deepest}" if depth is not None else "")
            )

    def check_base(self, base_fingerprint: str | None) -> None:
        """Refuse a lens trained on another base model (when both fingerprints are known)."""
        if self.base_fingerprint and base_fingerprint and self.base_fingerprint != base_fingerprint:
            raise UsageError(
                f"the tuned lens was trained on another model (fingerprint {self.base_fingerprint}, "
                f"this model {base_fingerprint})"
            )

    def indices(self, depth: Sequence[int]) -> list[int]:
        """The translator of each state: its depth, and the identity for the last (the output)."""
        return [*depth[:-1], self.num_layers]

    def translate(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """State ``index`` moved toward the final layer's basis (identity for the last state)."""
        if index == self.num_layers:
            return hidden
        translator = self.translators[index]
        return hidden + translator(hidden.to(translator.weight.dtype)).to(hidden.dtype)

    # -- persistence -------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write ``lens.safetensors`` + ``lens.json`` (shape, provenance, sha256) atomically."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            digest = save_tensors(tmp / LENS_WEIGHTS, self.state_dict())
            write_json(tmp / LENS_META, {
                "format": LENS_FORMAT,
                "version": LENS_VERSION,
                "model": self.model,
                "base_fingerprint": self.base_fingerprint,
                "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "training": self.training_config,
                "sha256": {LENS_WEIGHTS: digest},
            })
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> "TunedLens":
        """Read a lens directory, verifying the weights' sha256 and every tensor's shape."""
        path = Path(path)
        if path.name == LENS_META:
            path = path.parent
        meta = read_artifact_meta(path, LENS_META, "tuned lens", LENS_FORMAT, LENS_VERSION)
        try:
            lens = cls(int(meta["num_layers"]), int(meta["hidden_size"]), meta.get("model"),
                       meta.get("base_fingerprint"), meta.get("training"))
            digest = meta["sha256"][LENS_WEIGHTS]
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path / LENS_META} is incomplete or malformed: {exc}") from exc
        state = load_tensors(path / LENS_WEIGHTS, expected_sha256=digest)
        expected = {name: tuple(t.shape) for name, t in lens.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        if found != expected:
            raise UsageError(f"{path / LENS_WEIGHTS} does not hold {lens.num_layers} translators of width {lens.hidden_size}")
        lens.load_state_dict(state)
        return lens


def decode(model: nn.Module, hidden: torch.Tensor, index: int, lens: TunedLens | None = None) -> torch.Tensor:
    """Float32 next-token logits of state ``index``: the tuned lens when given, else the logit lens."""
    if lens is not None:
        hidden = lens.translate(hidden, index)
    return hidden_to_logits(model, hidden).float()


def _lens_indices(model: nn.Module, lens: TunedLens | None, depth: Sequence[int] | None) -> list[int]:
    """Checked per-state indices for :func:`decode`: translator indices, or plain state indices."""
    checked = check_depth(model, depth)
    if lens is None:
        return list(range(len(checked)))
    lens.check_model(model, depth)
    return lens.indices(checked)


def layer_log_probs(
    model: nn.Module, states: torch.Tensor, lens: TunedLens | None = None, depth: Sequence[int] | None = None
) -> torch.Tensor:
    """Log-probabilities [S, N, V] of every state [S, N, D] (for a chunk of tokens)."""
    indices = _lens_indices(model, lens, depth)
    return torch.stack([decode(model, h, i, lens).log_softmax(-1) for i, h in zip(indices, states)])


# ---------------------------------------------------------------------------------------------
# Statistics per layer


@dataclass
class LensStats:
    """How close each state's decoded distribution is to the model's final one, and to the text.

    Every list has one value per state ("emb", then layers 1..L). ``kl_to_final`` is
    KL(final || lens) in nats and ``top1_agreement`` the share of tokens whose argmax equals the
    final argmax, both averaged over all real tokens; ``cross_entropy`` (nats) and
    ``perplexity`` score the actual next token, over the tokens that have one. ``depth`` is each
    state's depth in the full model (:func:`emulator_depth`), the x axis on which models of
    different depth compare.
    """

    model: str
    lens: str
    num_layers: int
    samples: int
    tokens: int
    predicted_tokens: int
    kl_to_final: list[float]
    top1_agreement: list[float]
    cross_entropy: list[float]
    perplexity: list[float]
    depth: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.depth:
            self.depth = list(range(self.num_layers + 1))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LensStats":
        stats = cls(**dataclass_fields(cls, data, "lens statistics"))
        size = stats.num_layers + 1
        series = (stats.kl_to_final, stats.top1_agreement, stats.cross_entropy, stats.perplexity, stats.depth)
        if any(not isinstance(s, list) or len(s) != size for s in series):
            raise UsageError(f"lens statistics must hold {size} values per series for {stats.num_layers} layers")
        return stats


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_n <a_n, b_n> for [N, V] tensors: one dot per row (no [N, V] temporary), summed in float64."""
    return torch.einsum("nv,nv->n", a, b).double().sum().item()


@torch.no_grad()
def lens_statistics(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    lens: TunedLens | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    name: str = "model",
    depth: Sequence[int] | None = None,
    chunk_tokens: int = 1024,
) -> LensStats:
    """Per-state KL to the final distribution, top-1 agreement, cross-entropy and perplexity.

    Streams over batches of texts and decodes ``chunk_tokens`` tokens at a time, so memory is
    one batch's states plus a few [chunk, V] tensors; only per-state sums accumulate. ``depth``
    (an emulator's, see :func:`emulator_depth`) picks the tuned lens's translators and is
    recorded for plotting.
    """
    texts = list(texts)
    if not texts:
        raise UsageError("lens statistics need at least one text")
    indices = _lens_indices(model, lens, depth)
    num_states = len(indices)
    kl = torch.zeros(num_states, dtype=torch.float64)
    agree = torch.zeros(num_states, dtype=torch.float64)
    ce = torch.zeros(num_states, dtype=torch.float64)
    tokens = predicted = 0
    for batch in iter_token_states(model, tokenizer, texts, batch_size, max_length, desc=f"lens {name}"):
        for start in range(0, batch.num_tokens, chunk_tokens):
            states = batch.states[:, start : start + chunk_tokens]
            targets = batch.targets[start : start + chunk_tokens]
            has_next = targets != IGNORE_INDEX
            target_ids = targets.clamp_min(0)[:, None]
            final = decode(model, states[-1], indices[-1], lens).log_softmax(-1)
            final_p = final.exp()
            final_top = final.argmax(-1)
            # KL(final || q) = sum p log p - sum p log q: the first term is the same for every state.
            neg_entropy = _row_dots(final_p, final)
            for state, index in enumerate(indices):
                log_q = decode(model, states[state], index, lens).log_softmax(-1)
                kl[state] += neg_entropy - _row_dots(final_p, log_q)
                agree[state] += (log_q.argmax(-1) == final_top).sum().item()
                ce[state] -= log_q.gather(1, target_ids).squeeze(1)[has_next].sum().item()
            tokens += states.shape[1]
            predicted += int(has_next.sum())
    if predicted == 0:
        raise UsageError("the texts are too short: no token has a next token to predict")
    mean_ce = (ce / predicted).tolist()
    return LensStats(
        model=name,
        lens="logit" if lens is None else "tuned",
        num_layers=num_states - 1,
        samples=len(texts),
        tokens=tokens,
        predicted_tokens=predicted,
        kl_to_final=(kl / tokens).clamp_min(0.0).tolist(),
        top1_agreement=(agree / tokens).tolist(),
        cross_entropy=mean_ce,
        perplexity=[math.exp(min(x, 700.0)) for x in mean_ce],
        depth=check_depth(model, depth),
    )


# ---------------------------------------------------------------------------------------------
# Trajectory of one prompt


@dataclass
class Trajectory:
    """The lens figure's data: per state and token position, the top-1 next token and its probability.

    ``input_tokens[t]`` is the t-th token of the prompt; ``top_tokens[s][t]`` is what state s
    predicts after it, with probability ``top_probs[s][t]``. ``depth`` as in :class:`LensStats`.
    """

    prompt: str
    model: str
    lens: str
    num_layers: int
    input_tokens: list[str]
    top_tokens: list[list[str]]
    top_probs: list[list[float]]
    depth: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.depth:
            self.depth = list(range(self.num_layers + 1))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Trajectory":
        return cls(**dataclass_fields(cls, data, "trajectory"))


@torch.no_grad()
def trajectory(
    model: nn.Module,
    tokenizer,
    prompt: str,
    lens: TunedLens | None = None,
    name: str = "model",
    max_length: int = 64,
    depth: Sequence[int] | None = None,
) -> Trajectory:
    """Decode every state at every position of ``prompt`` (truncated to ``max_length`` tokens)."""
    if not prompt.strip():
        raise UsageError("the lens prompt is empty")
    indices = _lens_indices(model, lens, depth)
    batch = token_states(model, tokenizer, [prompt], max_length)
    ids = encode_text(tokenizer, prompt, max_length)
    top_tokens, top_probs = [], []
    for index, hidden in zip(indices, batch.states):
        probs, top = decode(model, hidden, index, lens).softmax(-1).max(-1)
        top_tokens.append([tokenizer.decode([t]) for t in top.tolist()])
        top_probs.append(probs.tolist())
    return Trajectory(
        prompt=prompt,
        model=name,
        lens="logit" if lens is None else "tuned",
        num_layers=len(batch.states) - 1,
        input_tokens=[tokenizer.decode([t]) for t in ids],
        top_tokens=top_tokens,
        top_probs=top_probs,
        depth=check_depth(model, depth),
    )
