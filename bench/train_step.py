"""One training step: blip2-jax (`train.trainer.Trainer`, the path `train/loop.py` runs) vs the
same step written in PyTorch from Hugging Face `transformers` modules, same weights, same batch,
same CPU, fp32.

Stages:
- stage 1: ITC + ITM + ITG (LAVIS `Blip2Qformer.forward`). Frozen ViT; trainable ln_vision,
  query tokens, Q-Former (text embeddings included), ITC projections, temp, ITM head and the
  ITG LM head (tied to the Q-Former word embeddings).
- stage 2 OPT: LM loss over [projected queries; BOS caption pad]. Frozen ViT and OPT; trainable
  ln_vision, query tokens, Q-Former and the language projection (ours: `configs/stage2.py`
  freezes `vision/.*` and `llm/.*`, so ln_vision trains too, as in LAVIS).

Ours: `Trainer(model_cfg, LossConfig, defaults.base_config().optimizer, mesh=run_config.make_mesh(...),
frozen=..., frozen_dtype="float32")`, then `trainer.lower(...).compile()` (timed: the compile
time), then calls of the compiled, donated step (the state is threaded through).

Torch: `Blip2ForImageTextRetrieval` (stage 1) / `Blip2ForConditionalGeneration` (stage 2) built
with the same shapes and randomised weights, saved with `save_pretrained` and loaded by
`blip2_jax.load`, so both sides start from the same numbers. HF has no stage-1 losses and no
ITG head; the bench writes them as LAVIS does (blip2_qformer.py, blip2_opt.py), mirroring
`blip2_jax/losses.py` and `blip2_jax/train/step.py`:
- ViT forward under `torch.no_grad`, then `post_layernorm` (= ln_vision) with gradients;
- ITC: max over queries of image·text / temp, the other modality detached in each direction,
  CE with label smoothing 0.1, `temp` an `nn.Parameter` at 0.07 (LAVIS init; HF has none);
- ITM: hard negatives drawn with `torch.multinomial` from the softmax of the similarities with
  the positives set to -10000; 3B pairs through the Q-Former with queries + text;
- ITG: [CLS] -> [DEC]; the text attends to the queries' self-attention K/V captured from the
  query pass (LAVIS's `past_key_values` reuse: forward hooks on HF's key/value projections) and
  causally to itself; layers run from the HF layer's own submodules and attention function
  (eager or SDPA); head = `transformers` `BertOnlyMLMHead`, decoder tied to the word embeddings;
- stage 2: ViT (no_grad) -> post_layernorm -> Q-Former -> language_projection -> OPT with
  `logits_to_keep` = the positions our step computes logits for (the last query and the text),
  HF causal-LM targets (the last query predicts BOS: LAVIS with no prompt);
- `torch.optim.AdamW` (betas 0.9/0.98, eps 1e-8, weight decay 0.05 except 1-D params and
  biases, as ours) over the trainable parameters only; no clipping (the default `clip_norm` 0).
ViT and OPT are in eval mode (no dropout), as ours (our frozen towers have no dropout).

Check (before timing, unless --no-check): with dropout off on both sides (our Q-Former config's
`hidden_dropout`/`attention_dropout` = 0, the torch modules in eval mode), one step of each from
the same weights. Printed per row: ours, torch (eager attention), |diff|, relative diff, and
|diff| for the loss terms of a gradient-free torch pass with SDPA. Rows: ITC and ITG (stage 1)
and LM (stage 2), which involve no sampling; ITM (torch is handed the negatives our step draws,
re-derived from our step's key schedule, so a mismatch there can also mean step.py's key
schedule changed); the total loss; the global norm of the trainable gradients; the parameter
norm after the AdamW update; and the trainable parameter counts. fp32 differences of ~1e-5 or
less mean both sides compute the same step. Then both are timed with the configured dropout
(0.1 in the Q-Former; --no-dropout: none on either side).

Timing: median ms/step over --iters rounds after two warm-up steps each; the contenders run in
alternating rounds (a busy machine slows all alike). Torch is timed with SDPA attention (its
fastest stock setting) and eager attention (the parity reference; --no-eager skips it). The
torch timed step is zero_grad + losses + backward + AdamW.step (no norms; ours also computes
grad/param norms as metrics). `ratio` = torch time / ours: > 1 means ours is faster (the
project's target is >= 1). `compile` = our `lower` + `compile` seconds (once per shape);
torch compiles nothing: its first timed step (fresh AdamW state) is printed beside it. The
load average is printed around each timing: this CPU may be shared, so compare figures from
one run only.

    python bench/train_step.py                 # both stages at the defaults (~2.5 min, 2 cores)
    python bench/train_step.py --stage 1 --iters 20 --json /tmp/train_step.json
    python bench/train_step.py --small         # tiny sizes, no dropout: a smoke run (< 1 min)
    python bench/train_step.py --no-check --no-eager --stage 2    # timing only

Defaults: width 256 (head dim 64), 4 layers in every tower, 224-px images with patch 14 (257
image tokens, the real BLIP-2 token count), 32 queries (the real count), batch 8, 32 text
tokens (LAVIS max_txt_len), vocab 4096, 10 timed steps. The sequence lengths are the real ones,
so attention, the query/image cross-attention and the 3B ITM pairs weigh as they do at full
size; width and depth are cut so a step takes ~0.5-1 s per side on 2 CPU cores and the run
(4 compiles of ~10-35 s included) fits in 2-4 minutes. `--small` (width 64, 1 layer per
tower with cross-attention in it, 56-px images, 8 queries, batch 4, 3 timed steps) times the
dropout-free step, i.e. the check's program: one compile per stage, which dominates a smoke run
(~45 s on this 2-core machine under load, mostly our stage-1 compile).

Threads: --threads sets torch's intra-op threads (default: all cores). XLA:CPU sizes its own
thread pool to the machine's cores and ignores this flag. OMP_WAIT_POLICY defaults to PASSIVE
here (--omp-wait-policy): with libgomp's default spinning, torch with 2 threads on 2 cores that
another process also uses ran ~20x slower than with 1 thread (18.8 s vs 0.9 s per stage-1
step), which would make any ratio meaningless; PASSIVE removes that (2 threads ~= 1 thread
under load). Its cost on an idle machine was not measured (this one was never idle); pass
--omp-wait-policy '' to time torch with libgomp's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]   # the package and tests/hf_ref.py
from blip2_jax import run_config
from blip2_jax.convert import mapping

CLS, SEP = 101, 102            # Q-Former text: [CLS] ... [SEP] [PAD]=0; [DEC] = vocab - 1
OPT_BOS, OPT_PAD = 2, 1


# ------------------------------------------------------------------------------------------------
# Models with the same weights
# ------------------------------------------------------------------------------------------------
def _tower_configs(a):
    vision = dict(hidden_size=a.width, intermediate_size=4 * a.width, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, image_size=a.image_size, patch_size=a.patch_size)
    qformer = dict(vocab_size=a.vocab, hidden_size=a.width, num_hidden_layers=a.layers,
                   num_attention_heads=a.heads, intermediate_size=4 * a.width,
                   cross_attention_frequency=a.cross_attention_frequency,
                   encoder_hidden_size=a.width,
                   max_position_embeddings=max(128, a.text_len))
    if not a.dropout:   # timed without dropout: the loaded config is then the check's config
        qformer.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision, qformer


def build_stage1(a):
    """(HF retrieval model, its tied ITG head, temp, our stage-1 config and params)."""
    import torch
    from transformers import BertConfig, Blip2Config, Blip2ForImageTextRetrieval
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    import blip2_jax
    import hf_ref
    vision, qformer = _tower_configs(a)
    cfg = Blip2Config(vision_config=vision,
                      qformer_config=dict(qformer, use_qformer_text_input=True),
                      num_query_tokens=a.queries, image_text_hidden_size=a.embed_dim)
    hf = hf_ref.randomize(Blip2ForImageTextRetrieval(cfg), seed=0, std=0.02)
    qc = hf.config.qformer_config
    head = BertOnlyMLMHead(BertConfig(hidden_size=a.width, vocab_size=a.vocab,
                                      hidden_act=qc.hidden_act, layer_norm_eps=qc.layer_norm_eps))
    hf_ref.randomize(head, seed=1, std=0.02)
    pred = head.predictions
    pred.decoder.weight = hf.embeddings.word_embeddings.weight     # tied (LAVIS / BERT)
    pred.decoder.bias = pred.bias
    temp = torch.nn.Parameter(torch.tensor(0.07))                  # LAVIS init
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = blip2_jax.load(d, dtype="float32")
    t = lambda x: x.detach().numpy().copy()                        # noqa: E731
    params = dict(ours.params)
    params["lm_head"] = {"transform": {"kernel": t(pred.transform.dense.weight).T,
                                       "bias": t(pred.transform.dense.bias)},
                         "ln": {"scale": t(pred.transform.LayerNorm.weight),
                                "bias": t(pred.transform.LayerNorm.bias)},
                         "bias": t(pred.bias)}
    params["temp"] = np.float32(temp.item())
    model_cfg = ours.config.replace(itg=True)
    mapping.check_params(model_cfg, params)
    return hf, head, temp, model_cfg, params


def build_stage2(a):
    """(HF Blip2ForConditionalGeneration with OPT, our config and params)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    import blip2_jax
    import hf_ref
    vision, qformer = _tower_configs(a)
    text = OPTConfig(vocab_size=a.vocab, hidden_size=a.width, num_hidden_layers=a.layers,
                     ffn_dim=4 * a.width, num_attention_heads=a.heads,
                     max_position_embeddings=max(256, a.queries + a.text_len + 2),
                     word_embed_proj_dim=a.width, dropout=0.0, attention_dropout=0.0,
                     bos_token_id=OPT_BOS, eos_token_id=OPT_BOS, pad_token_id=OPT_PAD)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      num_query_tokens=a.queries, image_token_index=a.vocab - 1)
    hf = hf_ref.randomize(Blip2ForConditionalGeneration(cfg), seed=0, std=0.02)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = blip2_jax.load(d, dtype="float32")
    return hf, ours.config, dict(ours.params)


def make_batch(a, stage: int) -> dict:
    """Host batch with the step's fields; right padding, varied lengths."""
    rng = np.random.default_rng(1)
    b, t = a.batch, a.text_len
    image = rng.normal(size=(b, a.image_size, a.image_size, 3)).astype(np.float32)
    lengths = [max(3, t - (3 * i) % (t // 2 + 1)) for i in range(b)]
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(1000, a.vocab - 1, size=(b, t)).astype(np.int32)
    if stage == 1:
        ids[:, 0] = CLS
        ids[np.arange(b), np.array(lengths) - 1] = SEP
        ids = np.where(mask > 0, ids, 0).astype(np.int32)
        return {"image": image, "valid": np.ones(b, bool), "qformer_ids": ids,
                "qformer_mask": mask}
    ids[:, 0] = OPT_BOS
    ids = np.where(mask > 0, ids, OPT_PAD).astype(np.int32)
    return {"image": image, "valid": np.ones(b, bool), "llm_ids": ids, "llm_mask": mask}


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------
class Ours:
    """The real training path: Trainer + its compiled, donated step."""

    def __init__(self, model_cfg, params, stage: int, batch: dict, a, *, dropout: bool):
        import jax

        from blip2_jax.train import defaults
        from blip2_jax.losses import LossConfig
        from blip2_jax.train.trainer import CompiledStep, Trainer
        if not dropout:
            model_cfg = model_cfg.replace(qformer=dataclasses.replace(
                model_cfg.qformer, hidden_dropout=0.0, attention_dropout=0.0))
        base = defaults.base_config()
        self.seed = 0
        lc = LossConfig(dec_token_id=a.vocab - 1) if stage == 1 else LossConfig(prompt_length=0)
        frozen = ("vision/.*",) if stage == 1 else ("vision/.*", "llm/.*")
        self.opt_cfg = dict(base.optimizer)
        self.trainer = Trainer(model_cfg, lc, self.opt_cfg, total_steps=10_000,
                               mesh=run_config.make_mesh(base), frozen=frozen, frozen_dtype="float32")
        self.state, self.frozen = self.trainer.init(params, seed=self.seed)
        self.batch = self.trainer.place(batch)
        t0 = time.perf_counter()
        lowered = self.trainer.lower(self.state, self.frozen, self.batch)
        t1 = time.perf_counter()
        self.step_fn = CompiledStep(lowered.compile())
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))

    def step(self):
        import jax
        self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
        jax.block_until_ready((self.state, metrics))
        return metrics

    def itm_key(self):
        """The key our stage-1 step hands `losses.itm_negatives` at step 0 (step.py's schedule:
        state.rng -> split[1] -> fold_in(step) -> loss_fn split[1] -> stage1_losses split[0])."""
        import jax
        _, k = jax.random.split(jax.random.PRNGKey(self.seed))
        k = jax.random.fold_in(k, 0)
        _, k_loss = jax.random.split(k)
        return jax.random.split(k_loss)[0]


# ------------------------------------------------------------------------------------------------
# Torch
# ------------------------------------------------------------------------------------------------
def _adamw(named_params, opt_cfg):
    import torch
    decay = [p for n, p in named_params if not (p.ndim == 1 or n.endswith("bias"))]
    no_decay = [p for n, p in named_params if p.ndim == 1 or n.endswith("bias")]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt_cfg.get("weight_decay", 0.0)},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt_cfg.get("lr", 1e-4), betas=(opt_cfg.get("b1", 0.9), opt_cfg.get("b2", 0.98)),
        eps=opt_cfg.get("eps", 1e-8))


class TorchStep:
    """Shared parts: frozen/trainable split, modes, optimizer, step, norms."""

    def __init__(self, modules: dict, frozen_prefixes, opt_cfg):
        import torch
        seen, named = set(), []
        for mname, mod in modules.items():
            items = ([(mname, mod)] if isinstance(mod, torch.nn.Parameter)
                     else [(f"{mname}.{n}", p) for n, p in mod.named_parameters()])
            for n, p in items:
                frozen = any(n.startswith(f) for f in frozen_prefixes)
                p.requires_grad_(not frozen)
                if not frozen and id(p) not in seen:
                    seen.add(id(p))
                    named.append((n, p))
        self.named = named
        self.params = [p for _, p in named]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt_cfg = opt_cfg
        if opt_cfg.get("clip_norm"):
            raise NotImplementedError("clip_norm > 0: add clip_grad_norm_ to TorchStep.step")
        self.new_optimizer()

    def new_optimizer(self):
        self.opt = _adamw(self.named, self.opt_cfg)

    def set_dropout(self, on: bool):
        """Dropout in the trainable towers (frozen ones stay in eval mode)."""
        raise NotImplementedError

    def losses(self, **kw):
        raise NotImplementedError

    def step(self, norms: bool = False, **kw):
        """zero_grad, losses, backward, AdamW. The timed step computes no norms (LAVIS's step
        does not; ours does, as metrics); `norms=True` (the check) adds the gradient norm."""
        import torch
        for p in self.params:
            p.grad = None
        total, terms = self.losses(**kw)
        total.backward()
        grad_norm = None
        if norms:
            grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params
                                       if p.grad is not None))
        self.opt.step()
        return total, terms, grad_norm

    def param_norm(self):
        import torch
        with torch.no_grad():
            return float(torch.sqrt(sum((p.double() ** 2).sum() for p in self.params)))


def _frozen_vit(vm, pixels):
    import torch
    with torch.no_grad():
        h = vm.embeddings(pixels)
        h = vm.encoder(inputs_embeds=h).last_hidden_state
    return vm.post_layernorm(h)          # ln_vision: trainable


class TorchStage1(TorchStep):
    def __init__(self, hf, head, temp, batch, opt_cfg, dec_id):
        import torch
        super().__init__({"hf": hf, "head": head, "temp": temp},
                         ("hf.vision_model.embeddings.", "hf.vision_model.encoder."), opt_cfg)
        self.hf, self.head, self.temp, self.dec_id = hf, head, temp, dec_id
        self.pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        self.ids = torch.from_numpy(batch["qformer_ids"].astype(np.int64))
        self.mask = torch.from_numpy(batch["qformer_mask"].astype(np.int64))
        b, t = self.ids.shape
        q = hf.config.num_query_tokens
        # UniLM rows of the text over [cached queries ; text]: all queries, text <= t, no padding.
        allowed = (torch.arange(t)[None, :, None] >= torch.arange(t)[None, None, :]) \
            & self.mask.bool()[:, None, :]
        allowed = torch.cat([torch.ones(b, t, q, dtype=torch.bool), allowed], 2)
        self.itg_mask = torch.zeros(b, 1, t, q + t).masked_fill(~allowed[:, None],
                                                                torch.finfo(torch.float32).min)
        dec = self.ids.clone()
        dec[:, 0] = dec_id
        self.dec = dec
        self.itg_labels = torch.where(self.mask[:, 1:] > 0, dec[:, 1:], -100)
        # Capture each layer's query-pass self-attention K/V (LAVIS past_key_values).
        self._capture = None
        for i, layer in enumerate(hf.qformer.encoder.layer):
            sa = layer.attention.attention
            for name in ("key", "value"):
                getattr(sa, name).register_forward_hook(self._hook(i, name))
        self.set_dropout(True)

    def _hook(self, i, name):
        def fn(module, inputs, output):
            if self._capture is not None:
                self._capture[(i, name)] = output
        return fn

    def set_dropout(self, on: bool):
        self.hf.train(on)
        self.head.train(on)
        self.hf.vision_model.eval()

    def _itg_hidden(self, cache):
        """Q-Former text pass attending to the cached query K/V (HF layers' own submodules)."""
        import torch
        from transformers.models.blip_2.modeling_blip_2 import (ALL_ATTENTION_FUNCTIONS,
                                                                eager_attention_forward)
        qf = self.hf.qformer
        h = qf.dropout(qf.layernorm(self.hf.embeddings(input_ids=self.dec)))
        b, t, _ = h.shape
        for i, layer in enumerate(qf.encoder.layer):
            sa = layer.attention.attention
            d = sa.attention_head_size
            heads = lambda x: x.view(b, x.shape[1], -1, d).transpose(1, 2)   # noqa: E731
            q = heads(sa.query(h))
            k = heads(torch.cat([cache[(i, "key")], sa.key(h)], 1))
            v = heads(torch.cat([cache[(i, "value")], sa.value(h)], 1))
            attn = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation,
                                                         eager_attention_forward)
            out, _ = attn(sa, q, k, v, self.itg_mask,
                          dropout=0.0 if not sa.training else sa.attention_dropout,
                          scaling=sa.scaling)
            h = layer.attention.output(out.reshape(b, t, -1), h)
            h = layer.feed_forward_chunk(h)
        return h

    def losses(self, neg_fn=None):
        import torch
        import torch.nn.functional as F
        hf, b = self.hf, self.ids.shape[0]
        nq = hf.config.num_query_tokens
        image = _frozen_vit(hf.vision_model, self.pixels)
        queries = hf.query_tokens.expand(b, -1, -1)
        self._capture = {}
        z = hf.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        cache, self._capture = self._capture, None
        # ITC
        image_feats = F.normalize(hf.vision_projection(z), dim=-1)
        text_h = hf.qformer(query_embeds=hf.embeddings(input_ids=self.ids), query_length=0,
                            attention_mask=self.mask).last_hidden_state
        text_feat = F.normalize(hf.text_projection(text_h[:, 0]), dim=-1)
        sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat.detach()).amax(-1) / self.temp
        sim_t2i = torch.einsum("te,iqe->tiq", text_feat, image_feats.detach()).amax(-1) / self.temp
        targets = torch.arange(b)
        itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
               + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        # ITM
        with torch.no_grad():
            if neg_fn is None:
                eye = torch.eye(b, dtype=torch.bool)
                w_t2i = F.softmax(sim_t2i.masked_fill(eye, -10000.0), dim=1)
                w_i2t = F.softmax(sim_i2t.masked_fill(eye, -10000.0), dim=1)
                neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
                neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
            else:
                neg_image, neg_text = neg_fn(sim_i2t, sim_t2i)
        images = torch.cat([image, image[neg_image], image])
        ids = torch.cat([self.ids, self.ids, self.ids[neg_text]])
        mask = torch.cat([self.mask, self.mask, self.mask[neg_text]])
        emb = hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(3 * b, -1, -1))
        full_mask = torch.cat([torch.ones(3 * b, nq, dtype=mask.dtype), mask], 1)
        hh = hf.qformer(query_embeds=emb, query_length=nq, attention_mask=full_mask,
                        encoder_hidden_states=images).last_hidden_state
        itm_logits = hf.itm_head(hh[:, :nq]).mean(1)
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long),
                                torch.zeros(2 * b, dtype=torch.long)])
        itm = F.cross_entropy(itm_logits, itm_labels)
        # ITG
        logits = self.head(self._itg_hidden(cache))
        itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                              self.itg_labels.reshape(-1), ignore_index=-100, label_smoothing=0.1)
        return itc + itm + itg, {"itc": itc, "itm": itm, "itg": itg}


class TorchStage2(TorchStep):
    def __init__(self, hf, batch, opt_cfg):
        import torch
        super().__init__({"hf": hf}, ("hf.vision_model.embeddings.", "hf.vision_model.encoder.",
                                      "hf.language_model."), opt_cfg)
        self.hf = hf
        self.pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        self.ids = torch.from_numpy(batch["llm_ids"].astype(np.int64))
        self.mask = torch.from_numpy(batch["llm_mask"].astype(np.int64))
        b, _ = self.ids.shape
        nq = hf.config.num_query_tokens
        self.full_mask = torch.cat([torch.ones(b, nq, dtype=torch.long), self.mask], 1)
        self.labels = torch.where(self.mask > 0, self.ids, -100)   # no prompt: BOS is a target
        self.set_dropout(True)

    def set_dropout(self, on: bool):
        self.hf.train(on)
        self.hf.vision_model.eval()
        self.hf.language_model.eval()

    def losses(self):
        import torch
        import torch.nn.functional as F
        hf, b = self.hf, self.ids.shape[0]
        t = self.ids.shape[1]
        image = _frozen_vit(hf.vision_model, self.pixels)
        z = hf.qformer(query_embeds=hf.query_tokens.expand(b, -1, -1),
                       encoder_hidden_states=image).last_hidden_state
        prefix = hf.language_projection(z)
        lm = hf.language_model
        embeds = torch.cat([prefix, lm.get_input_embeddings()(self.ids)], 1)
        # Logits of the last query and the text (what ours computes): the last query predicts
        # BOS, text position j predicts token j+1 (HF's shifted causal-LM targets).
        logits = lm(inputs_embeds=embeds, attention_mask=self.full_mask,
                    logits_to_keep=t + 1).logits
        loss = F.cross_entropy(logits[:, :t].float().reshape(-1, logits.shape[-1]),
                               self.labels.reshape(-1), ignore_index=-100)
        return loss, {"lm": loss}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def timeit_interleaved(fns: dict, iters: int, warmup: int = 2) -> tuple[dict, dict]:
    """({name: median s/call}, {name: first-call s}); alternating rounds. fns: name -> (setup,
    fn); setup runs untimed before each call."""
    first = {}
    for name, (setup, fn) in fns.items():
        for w in range(warmup):
            setup()
            t0 = time.perf_counter()
            fn()
            if w == 0:
                first[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, (setup, fn) in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, first


def check(stage, ours_nodrop: Ours, torch_step: TorchStep, hf) -> dict:
    """One step each with dropout off, from the same weights: |ours - torch| per loss term, the
    gradient norm and the parameter norm after the update (torch: eager attention); the loss
    terms also from a gradient-free torch pass with SDPA attention."""
    import jax.numpy as jnp
    import torch

    from blip2_jax import losses
    m = {k: float(v) for k, v in ours_nodrop.step().items()}
    torch_step.set_dropout(False)
    torch_step.new_optimizer()
    kw = {}
    if stage == 1:
        key = ours_nodrop.itm_key()

        def neg_fn(sim_i2t, sim_t2i):
            ni, nt = losses.itm_negatives(key, jnp.asarray(sim_i2t.numpy()),
                                          jnp.asarray(sim_t2i.numpy()))
            return torch.from_numpy(np.asarray(ni).astype(np.int64)), \
                torch.from_numpy(np.asarray(nt).astype(np.int64))
        kw["neg_fn"] = neg_fn
    hf.set_attn_implementation("sdpa")
    with torch.no_grad():
        _, sdpa_terms = torch_step.losses(**kw)
    hf.set_attn_implementation("eager")
    total, terms, gnorm = torch_step.step(norms=True, **kw)
    theirs = {k: v.item() for k, v in terms.items()}
    theirs.update(loss=total.item(), grad_norm=gnorm.item(), param_norm=torch_step.param_norm())
    torch_step.set_dropout(True)
    torch_step.new_optimizer()
    out = {}
    for k, v in theirs.items():
        out[k] = {"ours": m[k], "torch": v, "abs_diff": abs(m[k] - v),
                  "rel_diff": abs(m[k] - v) / max(abs(v), 1e-30)}
        if k in sdpa_terms:
            out[k]["torch_sdpa"] = sdpa_terms[k].item()
            out[k]["abs_diff_sdpa"] = abs(m[k] - out[k]["torch_sdpa"])
    return out


def prepare_stage(stage: int, a) -> dict:
    """Both sides of one stage, built and (ours) compiled: the check's dropout-free program and
    the timed one (the same program with --no-dropout)."""
    t0 = time.perf_counter()
    batch = make_batch(a, stage)
    if stage == 1:
        hf, head, temp, model_cfg, params = build_stage1(a)
    else:
        hf, model_cfg, params = build_stage2(a)
    from blip2_jax.train import defaults
    opt_cfg = dict(defaults.base_config().optimizer)
    torch_step = (TorchStage1(hf, head, temp, batch, opt_cfg, a.vocab - 1) if stage == 1
                  else TorchStage2(hf, batch, opt_cfg))
    build_s = time.perf_counter() - t0
    nodrop = Ours(model_cfg, params, stage, batch, a, dropout=False) if a.check else None
    if a.dropout or nodrop is None:
        ours = Ours(model_cfg, params, stage, batch, a, dropout=a.dropout)
    else:
        ours = nodrop                       # timed without dropout: the check's program
    return dict(stage=stage, hf=hf, torch_step=torch_step, nodrop=nodrop, ours=ours,
                build_s=build_s, prepare_s=time.perf_counter() - t0)


def run_stage(p: dict, a) -> dict:
    stage, hf, torch_step, nodrop, ours = (p[k] for k in ("stage", "hf", "torch_step", "nodrop",
                                                          "ours"))
    name = "stage 1 (ITC+ITM+ITG)" if stage == 1 else "stage 2 OPT (LM)"
    print(f"\n== {name} ==  (models built in {p['build_s']:.1f} s, built + compiled in "
          f"{p['prepare_s']:.1f} s)", flush=True)

    result = {"stage": stage, "timed_with_dropout": a.dropout}
    if a.check:
        result["trainable_params_ours"] = nodrop.trainable
        result["trainable_params_torch"] = torch_step.trainable
        if nodrop.trainable != torch_step.trainable:
            print(f"WARNING: trainable parameters differ: ours {nodrop.trainable}, "
                  f"torch {torch_step.trainable}")
        result["check"] = check(stage, nodrop, torch_step, hf)
        result["check_compile_s"] = nodrop.lower_s + nodrop.compile_s
        print(f"check (dropout off, one step from the same weights; trainable params ours "
              f"{result['trainable_params_ours']}, torch {torch_step.trainable}):")
        print(f"  {'':10s} {'ours':>12s} {'torch eager':>12s} {'|diff|':>9s} {'rel':>8s}"
              f"   {'|diff| sdpa':>11s}")
        for k, v in result["check"].items():
            sd = f"{v['abs_diff_sdpa']:11.2e}" if "abs_diff_sdpa" in v else ""
            print(f"  {k:10s} {v['ours']:12.6f} {v['torch']:12.6f} {v['abs_diff']:9.2e} "
                  f"{v['rel_diff']:8.1e}   {sd}")
        print("  (" + ("itm: torch is handed the negatives our step draws (its key schedule "
                       "re-derived); itc/itg use no sampling. " if stage == 1 else "")
              + "grad_norm: global norm of the trainable gradients; param_norm: after the "
              "AdamW update; sdpa: loss terms of a gradient-free torch pass with SDPA)")

    torch_step.set_dropout(a.dropout)
    result["trainable_params"] = ours.trainable
    result["ours_lower_s"], result["ours_compile_s"] = ours.lower_s, ours.compile_s
    result["flops_per_step"] = ours.step_fn.flops_per_step

    impls = ["sdpa"] + (["eager"] if a.eager else [])

    def setter(impl):
        return lambda: hf.set_attn_implementation(impl)
    fns = {"ours": (lambda: None, ours.step)}
    for impl in impls:
        fns[f"torch_{impl}"] = (setter(impl), torch_step.step)
    load0 = _load()
    t, first = timeit_interleaved(fns, a.iters)
    result["load_average"] = {"before": load0, "after": _load()}
    result.update({f"{k}_ms": v * 1e3 for k, v in t.items()})
    result["torch_first_step_s"] = first["torch_sdpa"]
    result["ours_first_call_s"] = first["ours"]
    for impl in impls:
        result[f"ratio_{impl}"] = t[f"torch_{impl}"] / t["ours"]

    print(f"ours  (blip2-jax Trainer, XLA)        {t['ours'] * 1e3:9.1f} ms/step   "
          f"{a.batch / t['ours']:7.1f} samples/s")
    for impl in impls:
        label = f"torch (HF modules, {impl} attention)"
        print(f"{label:37s} {t[f'torch_{impl}'] * 1e3:9.1f} ms/step   "
              f"{a.batch / t[f'torch_{impl}']:7.1f} samples/s   "
              f"ratio torch/ours {t[f'torch_{impl}'] / t['ours']:.2f}")
    print(f"load average (1/5/15 min) before timing {load0}, after {_load()} on "
          f"{os.cpu_count()} cores")
    flops = ours.step_fn.flops_per_step
    if flops:
        print(f"XLA cost analysis: {flops / 1e9:.1f} GFLOP/step -> ours "
              f"{flops / t['ours'] / 1e9:.1f} GFLOP/s")
    print(f"compile: ours lower {ours.lower_s:.2f} s + compile {ours.compile_s:.2f} s = "
          f"{ours.lower_s + ours.compile_s:.2f} s (once per shape), then first call "
          f"{first['ours']:.2f} s; torch first step {first['torch_sdpa']:.2f} s (no compile; "
          f"fresh AdamW state)")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["1", "2", "both"], default="both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10, help="timed steps per contender")
    ap.add_argument("--width", type=int, default=256, help="hidden size of every tower")
    ap.add_argument("--layers", type=int, default=4, help="layers of every tower")
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: width // 64)")
    ap.add_argument("--cross-attention-frequency", type=int, default=2,
                    help="Q-Former layers per cross-attention layer (BLIP-2: 2)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096, help="Q-Former and OPT vocabulary")
    ap.add_argument("--embed-dim", type=int, default=256, help="ITC projection width")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: all cores); XLA uses its own pool")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads unless already set in the "
                         "environment ('' leaves libgomp's default, ACTIVE spinning)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch with eager attention")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare one dropout-free step of both sides before timing")
    ap.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=True,
                    help="time with the configured Q-Former dropout (0.1) on both sides; "
                         "--no-dropout times the dropout-free step (the check's program: one "
                         "compile per stage instead of two)")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes for a quick smoke run (implies --no-dropout)")
    ap.add_argument("--json", help="write the figures to this path")
    a = ap.parse_args(argv)
    if a.small:
        a.batch, a.width, a.layers, a.image_size, a.queries = 4, 64, 1, 56, 8
        a.cross_attention_frequency = 1
        a.text_len, a.vocab, a.embed_dim, a.iters = 12, 1024, 32, min(a.iters, 3)
        a.dropout = False
    a.heads = a.heads or max(1, a.width // 64)

    if "torch" in sys.modules and a.omp_wait_policy:
        print("note: torch already imported; --omp-wait-policy has no effect")
    if a.omp_wait_policy:
        os.environ.setdefault("OMP_WAIT_POLICY", a.omp_wait_policy)
    import jax
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads or os.cpu_count())
    torch.manual_seed(0)
    print(f"device: jax {jax.devices()[0].device_kind} (XLA:CPU thread pool: its own, all "
          f"cores), torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} cores; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"load average {_load()}")
    print(f"config: width {a.width}, {a.layers} layers/tower, {a.heads} heads, image "
          f"{a.image_size}px patch {a.patch_size} ({(a.image_size // a.patch_size) ** 2 + 1} "
          f"tokens), {a.queries} queries, text {a.text_len}, vocab {a.vocab}, batch {a.batch}, "
          f"fp32, {a.iters} timed steps each (median), alternating rounds, "
          f"{'Q-Former dropout 0.1' if a.dropout else 'no dropout'} while timed")
    stages = [1, 2] if a.stage == "both" else [int(a.stage)]
    results = {"config": {k: v for k, v in vars(a).items() if k != "json"},
               "device": {"jax": jax.devices()[0].device_kind, "torch_threads":
                          torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "jax_version": jax.__version__},
               "stages": {}}
    for s in stages:
        results["stages"][f"stage{s}"] = run_stage(prepare_stage(s, a), a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {a.json}")
    return results


if __name__ == "__main__":
    main()
