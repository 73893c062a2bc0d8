"""Pivotal tuning: new tokens trained as text-encoder embeddings together with the LoRA (guide §3, §5).

A brand-new token has no meaning in the base model, so a plain LoRA must teach the concept through the
word pieces the tokenizer makes of it (`vexdef` = `vex` + `def`), pieces that other prompts use too: the
LoRA bleeds. Here the token gets vectors of its own (textual inversion), initialised from a word
(`init_word`) and trained with their own learning rate while the LoRA trains; the concept lives in the
vectors and the LoRA has less to change.

Config keys (group "pivotal"; kohya's `train_textual_inversion.py` names where they exist):
`token_string` (the new tokens, comma-separated), `init_word` (one per token, or one for all; empty =
random vectors), `num_vectors_per_token`, `embedding_lr` (sd-scripts' pivotal-tuning proposal, PR #1013;
-1 = text_encoder_lr when above 0, else learning_rate) and `stop_embedding_training` (ours: after this many
steps the vectors freeze and the LoRA trains on, diffusers' `train_text_encoder_ti_frac` as a step count).

What differs from the LoRA recipe (the loss is its loss):
- `prepare` checks the keys and the init words before anything loads (`pivotal_settings`, the init word's
  tokens against num_vectors_per_token), refuses cached text-encoder outputs and a `resume` state folder
  without the new tokens' vectors, then prepares the standard run; `param_groups` (called once, after the network
  exists) adds the new tokens to the tokenizers and text encoders (`models/embeddings.py`: both encoders
  of SDXL) and returns the LoRA groups plus one group of the new vectors at `embedding_lr`;
- gradients flow through the text encoders while the vectors train, also for a UNet-only LoRA
  (`run.train_te`; kohya's `stop_text_encoder_training` stops them too); `FreezeEmbeddings` freezes
  them at `stop_embedding_training` and keeps them exactly as they were from then on;
- `extra_tensors`: the vectors bundled in the LoRA file, `bundle_emb.<token>.string_to_param.*` (SD 1.x/2.x)
  or `bundle_emb.<token>.clip_l` / `.clip_g` (SDXL), as A1111 reads them; `save_files` writes each token as
  its own embedding file `<lora stem>_emb/<token>.safetensors` (`emb_params`, or `clip_l` / `clip_g`) that
  A1111 and ComfyUI load by its name; `extra_metadata`: `loralab_pivotal` (JSON: tokens, init words,
  vectors, steps trained).
Samples during training and `loralab generate` read the new words through `models/text.py` `tokenize`.
`network_weights` may be a pivotal LoRA: its bundled tokens continue from their trained vectors.
Resume: `StateEmbeddings` writes the vectors into every state folder the run saves (`train/state.py`
EMBEDDINGS_FILE, fp32), and a resumed run starts its tokens from them (before network_weights and init
words), with the optimizer's state of their group, so it ends with the same file as a straight run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loralab.config import TrainConfig
from loralab.errors import LoralabError
from loralab.models.embeddings import add_new_token, check_word, init_vectors, init_word_ids, token_pieces
from loralab.models.tokenizer import clip_tokenizer
from loralab.network.files import bundle_tensors, embeddings_folder, save_embedding_file
from loralab.recipes.lora import LoRARecipe
from loralab.train.callbacks import Callback
from loralab.train.loop import TrainResult, fit
from loralab.train.run import Run, lora_param_groups
from loralab.train.state import EMBEDDINGS_FILE, STATE_FILE

log = logging.getLogger(__name__)


@dataclass
class PivotalSettings:
    tokens: list[str]
    init_words: list[str]
    vectors: int
    lr: float
    stop: int


def pivotal_settings(cfg: TrainConfig) -> PivotalSettings:
    """The pivotal keys, checked: one word per token, one init word per token (or one for all), at least
    one vector, a learning rate of 0 or more."""
    tokens = [check_word(t.strip()) for t in cfg.token_string.split(",")]
    if len(set(tokens)) != len(tokens):
        raise LoralabError(f"token_string: {cfg.token_string!r} names a token twice")
    words = [w.strip() for w in cfg.init_word.split(",")] if cfg.init_word.strip() else [""]
    if len(words) == 1:
        words = words * len(tokens)
    if len(words) != len(tokens):
        raise LoralabError(f"init_word: {len(words)} init words for {len(tokens)} tokens ({', '.join(tokens)}); "
                           "give one per token, comma-separated, or one for all")
    if cfg.num_vectors_per_token < 1:
        raise LoralabError(f"num_vectors_per_token: at least 1, got {cfg.num_vectors_per_token}")
    if cfg.stop_embedding_training < 0:
        raise LoralabError(f"stop_embedding_training: 0 (never) or a step count, got {cfg.stop_embedding_training}")
    te_lr = cfg.text_encoder_lr if not isinstance(cfg.text_encoder_lr, list) else max(cfg.text_encoder_lr)
    lr = cfg.embedding_lr if cfg.embedding_lr >= 0 else (te_lr if te_lr > 0 else cfg.learning_rate)
    return PivotalSettings(tokens, words, cfg.num_vectors_per_token, lr, cfg.stop_embedding_training)


def warn_split(tokenizer, token: str) -> list[str]:
    """Warn when the base tokenizer reads the new token as existing tokens (returns the pieces): where the
    embedding is not loaded (another program without it, a prompt without the LoRA) the word means those."""
    pieces = token_pieces(tokenizer, token)
    if len(pieces) == 1:
        log.warning("token_string %r is already a token of the vocabulary (%s): while the embedding is loaded its "
                    "trained vectors replace that word's meaning", token, pieces[0])
    else:
        log.warning("token_string %r: the tokenizer splits it into existing tokens %s; it trains as one new token, "
                    "but where its embedding is not loaded a prompt reads it as those pieces", token,
                    " + ".join(pieces))
    return pieces


@dataclass
class NewTokens:
    """The trained vectors of a run: per token, one parameter per text encoder."""
    settings: PivotalSettings
    params: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    frozen: dict[str, list[torch.Tensor]] | None = None  # the values kept from stop_embedding_training on
    steps_trained: int = 0

    def all_params(self) -> list[torch.nn.Parameter]:
        return [p for ps in self.params.values() for p in ps]


def add_run_tokens(run: Run, s: PivotalSettings) -> NewTokens:
    """Add the new tokens to the run's tokenizers and text encoders, each from its init word's embeddings."""
    from loralab.models.embeddings import extended_embedding

    m = run.model
    out = NewTokens(s)
    gen = torch.Generator().manual_seed(run.cfg.seed)
    earlier = bundled_in(run.cfg.network_weights, m.family, s.vectors) if run.cfg.network_weights else {}
    if run.cfg.resume:
        earlier = state_embeddings(Path(run.cfg.resume), s, len(m.text_encoders))
    for token, word in zip(s.tokens, s.init_words):
        warn_split(m.tokenizers[0], token)
        vectors = earlier.get(token) or [
            init_vectors(tok, extended_embedding(te).base.weight, word, s.vectors, token=token, generator=gen)
            for tok, te in zip(m.tokenizers, m.text_encoders)]
        out.params[token] = add_new_token(m.tokenizers, m.text_encoders, token, vectors)
        log.info("pivotal: new token %r, %d vector(s) per text encoder, from %s", token, s.vectors,
                 ("the resume state" if run.cfg.resume else "network_weights") if token in earlier
                 else repr(word) if word else "random vectors")
    return out


def bundled_in(path: str, family: str, n: int) -> dict[str, list[torch.Tensor]]:
    """The embeddings bundled in `network_weights` (a pivotal LoRA continued): each token there starts from
    its trained vectors instead of its init word; their count must be num_vectors_per_token."""
    from loralab.network.files import embedding_parts, read_weights, split_bundle

    out = {}
    for token, data in split_bundle(read_weights(path))[1].items():
        parts = embedding_parts(data, family, f"network_weights {path} (bundle_emb.{token})")
        if parts[0].shape[0] != n:
            raise LoralabError(f"network_weights {path}: its embedding {token!r} has {parts[0].shape[0]} vectors, "
                               f"num_vectors_per_token is {n}; set num_vectors_per_token = {parts[0].shape[0]}")
        out[token.lower()] = parts
    return out


def state_embeddings(folder: Path, s: PivotalSettings, encoders: int) -> dict[str, list[torch.Tensor]]:
    """The new tokens' vectors of a state folder (`EMBEDDINGS_FILE`: "<token>.<encoder>"); each token of the
    config must be there with num_vectors_per_token vectors per text encoder."""
    from safetensors.torch import load_file

    sd = load_file(str(folder / EMBEDDINGS_FILE))
    out = {}
    for token in s.tokens:
        parts = [sd.get(f"{token}.{i}") for i in range(encoders)]
        if any(p is None for p in parts) or any(p.shape[0] != s.vectors for p in parts):
            have = sorted({k.rsplit(".", 1)[0] for k in sd})
            raise LoralabError(f"resume: {folder / EMBEDDINGS_FILE} holds the tokens {', '.join(have) or 'none'} "
                               f"({', '.join(str(tuple(v.shape)) for v in sd.values())}), not {token!r} with "
                               f"{s.vectors} vector(s) per text encoder; resume with the token_string and "
                               "num_vectors_per_token of the run that saved it")
        out[token] = parts
    return out


class StateEmbeddings(Callback):
    """After each hook: a state folder of this run saved at the current step (its counters say so) that
    lacks the new tokens' vectors gets them (`EMBEDDINGS_FILE`, temp file then rename). A state is always
    a fresh folder (`train/state.py` renames a new one in), so a missing file means a state just saved."""

    def __init__(self, tokens: NewTokens):
        self.tokens = tokens

    def on_step_end(self, run: Run) -> None:
        self.write(run)

    def on_epoch_end(self, run: Run) -> None:
        self.write(run)

    def on_train_end(self, run: Run) -> None:
        self.write(run)

    def write(self, run: Run) -> None:
        from safetensors.torch import save_file

        if not run.is_main:
            return
        name = run.cfg.output_name
        for folder in (p for p in run.out_dir.iterdir() if p.name.startswith(name) and p.name.endswith("-state")):
            f = folder / EMBEDDINGS_FILE
            if f.exists() or not (folder / STATE_FILE).is_file():
                continue
            if json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("global_step") != run.global_step:
                continue
            tensors = {f"{k}.{i}": p.detach().float().contiguous().cpu()
                       for k, ps in self.tokens.params.items() for i, p in enumerate(ps)}
            tmp = folder / (EMBEDDINGS_FILE + ".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(f)


class FreezeEmbeddings(Callback):
    """At `stop_embedding_training` steps: the vectors stop training (no gradient, the text encoders' gradients
    off again when their LoRA does not train) and are held at their values from then on."""

    def __init__(self, tokens: NewTokens, te_trained: bool):
        self.tokens, self.te_trained = tokens, te_trained

    def on_train_start(self, run: Run) -> None:
        self.on_step_end(run)

    def on_step_end(self, run: Run) -> None:
        t = self.tokens
        stop = t.settings.stop
        if t.frozen is None:
            t.steps_trained = min(run.global_step, stop) if stop else run.global_step  # a resume past stop too
            if not stop or run.global_step < stop:
                return
            t.frozen = {k: [p.detach().clone() for p in ps] for k, ps in t.params.items()}
            for p in t.all_params():
                p.requires_grad_(False)
                p.grad = None
            run.train_te = self.te_trained
            log.info("pivotal: the new tokens' embeddings are frozen after %d steps (stop_embedding_training)",
                     run.global_step)
        with torch.no_grad():  # an optimizer with momentum (or an all-reduce's zero gradient) may still move them
            for k, ps in t.params.items():
                for p, v in zip(ps, t.frozen[k]):
                    p.copy_(v)


class PivotalRecipe(LoRARecipe):
    name = "pivotal"

    def __init__(self) -> None:
        self.tokens: NewTokens | None = None
        self.te_trained = False

    def prepare(self, cfg: TrainConfig) -> Run:
        settings = pivotal_settings(cfg)
        if cfg.resume and (Path(cfg.resume) / STATE_FILE).is_file() and not (Path(cfg.resume) / EMBEDDINGS_FILE).is_file():
            raise LoralabError(f"resume: the state folder {cfg.resume} has no {EMBEDDINGS_FILE} (the new tokens' "
                               "vectors; states saved before pivotal runs kept them lack it): it cannot continue a "
                               "pivotal run; start the run again, or continue from its LoRA file with "
                               "network_weights (its bundled tokens continue from their trained vectors)")
        if cfg.cache_text_encoder_outputs:
            raise LoralabError("cache_text_encoder_outputs: pivotal tuning trains the new tokens' embeddings, so "
                               "the text encoders' outputs change every step; set cache_text_encoder_outputs = false")
        tok = clip_tokenizer()  # every SD text encoder reads CLIP's vocabulary: the init words are checked now
        for token, word in zip(settings.tokens, settings.init_words):
            if word:
                init_word_ids(tok, word, settings.vectors, token=token)
        self.settings = settings
        return super().prepare(cfg)

    def param_groups(self, run: Run) -> list[dict]:
        """The LoRA groups and the new tokens' group (the tokens are added here, once the network exists)."""
        groups = lora_param_groups(run)
        self.tokens = add_run_tokens(run, self.settings)
        self.te_trained = run.train_te
        run.train_te = True  # gradients through the text encoders reach the new vectors
        groups.append({"params": self.tokens.all_params(), "lr": self.settings.lr, "name": "embeddings"})
        return groups

    def embeddings(self) -> dict[str, list[torch.Tensor]]:
        """{token: [its vectors per text encoder]} as they are now."""
        return {k: [p.detach() for p in ps] for k, ps in self.tokens.params.items()} if self.tokens else {}

    def extra_tensors(self, run: Run) -> dict[str, torch.Tensor]:
        return bundle_tensors(self.embeddings(), run.model.family)

    def extra_metadata(self, run: Run) -> dict[str, str]:
        s = self.settings
        return {"loralab_pivotal": json.dumps({
            "tokens": s.tokens, "init_words": s.init_words, "num_vectors_per_token": s.vectors,
            "embedding_lr": s.lr, "stop_embedding_training": s.stop,
            "embedding_steps": self.tokens.steps_trained if self.tokens else 0})}

    def save_files(self, run: Run, lora_path: Path) -> list[Path]:
        """Each token as a separate embedding file, `<lora stem>_emb/<token>.safetensors` (main process)."""
        folder = embeddings_folder(lora_path)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for token, parts in self.embeddings().items():
            path = folder / f"{token}.safetensors"
            save_embedding_file(path, parts, run.model.family, run.save_dtype,
                                {"name": token, "loralab_lora": lora_path.name, **self.extra_metadata(run)})
            out.append(path)
        return out

    def callbacks(self, run: Run) -> list[Callback]:
        return [FreezeEmbeddings(self.tokens, self.te_trained), *super().callbacks(run), StateEmbeddings(self.tokens)]


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Prepare a pivotal-tuning run from the config and fit it."""
    recipe = PivotalRecipe()
    return fit(recipe.prepare(cfg), recipe, callbacks)
