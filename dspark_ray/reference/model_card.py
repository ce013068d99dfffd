"""README.md model cards of the reference target and draft, rendered from the build metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REBUILD = "dspark-ray build-reference --out dspark_ray/assets/reference"
# Measured while sizing the recipe (default steps) on the shared 2-core CPU machine.
CPU_TIMING = (
    "The default recipe is sized for a 2-core CPU: there the target's first 50 steps ran at\n"
    "1.7-2.0 s/step (batch 16 x 256), i.e. ~23-27 min for its 800 steps, plus the draft (not\n"
    "timed on CPU); the full CPU run was not completed here because other jobs then slowed the\n"
    "shared machine to ~15 s/step. Use\n"
    "`--device cuda` where a GPU is available (the same recipe; GPU kernels may differ in the\n"
    "last bits, so GPU builds are not byte-identical to CPU ones).\n"
)


def _common(metrics: dict[str, Any]) -> str:
    data = metrics["data"]
    return f"""## Data

Source files of the Python standard library ({data['stdlib']}), `*.py` only, tests and
site-packages excluded, sorted by path. A stable hash of each relative path puts ~3% of the
files in a held-out split ({data['heldout_files']} files, {data['heldout_tokens']} tokens);
the other {data['train_files']} files ({data['train_tokens']} tokens) are the training split.
Tokenizer: byte-level BPE, vocabulary {data['vocab_size']}, trained on the training split;
`<|endoftext|>` is bos/eos/pad/unk; `<|system|>`, `<|user|>`, `<|assistant|>` serve a small
chat template (`<|role|>\\n...\\n`, then `<|assistant|>\\n` as the generation prompt).

## Storage

Weights are stored in **bfloat16** in `model.safetensors` to keep the bundled files small;
`config.json` declares float32, so `AutoModelForCausalLM.from_pretrained(dir)` loads float32
weights (exact upcast). The reported held-out numbers are measured on those float32 weights.

## Rebuild

```
{REBUILD}                          # CPU, 2 threads
{REBUILD} --device cuda --threads 8  # how these weights were built
```

On a machine whose Python is not {metrics['data']['stdlib']}, point `DSPARK_REFERENCE_STDLIB` at a
copy of that standard library made with `dspark_ray.reference.corpus.export_copy` (done so here).

Seeded (seed {metrics['seed']}); on CPU the same seed and thread count reproduce the weights
byte for byte. These weights were built on: {metrics.get('machine', metrics.get('device', 'cpu'))}
(whole build {metrics.get('build_seconds', 0) / 60:.1f} min).
{CPU_TIMING}"""


def _recipe(train: dict[str, Any]) -> str:
    return (
        f"- steps {train['steps']}, batch {train['batch_size']} x {train['seq_len']} tokens "
        f"({train['tokens']} tokens seen)\n"
        f"- AdamW (betas {train['betas']}, weight decay {train['weight_decay']}), peak lr "
        f"{train['lr']}, {train['warmup_steps']} warmup steps, cosine decay to "
        f"{train['min_lr_ratio']} x peak, grad clip {train['grad_clip']}\n"
        f"- training time here: {train['seconds'] / 60:.1f} min "
        f"({train['tokens'] / train['seconds']:.0f} tokens/s), final train loss "
        f"{train['final_loss']:.3f}\n"
    )


def _sweep(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["", "Draft shapes tried (same target, seed and steps); the first is this model:", ""]
    lines += ["| shape | params | held-out loss | top-1 agreement |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['params']:,} | {row['heldout_loss']:.4f} "
                     f"| {row['agreement']:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def target_card(metrics: dict[str, Any]) -> str:
    target = metrics["target"]
    return f"""# dspark-ray reference target (DeepSeek-V3 architecture, {target['total_params'] / 1e6:.1f}M)

A small **target** model for testing and benchmarking lossless speculative decoding with
`dspark_ray`: the DeepSeek-V3 architecture (`DeepseekV3ForCausalLM`) scaled down and trained
from scratch on Python source code. A test fixture, not a useful assistant.

## Architecture

{target['architecture']}

- parameters: **{target['total_params']:,} total**, **{target['active_params']:,} active per token**
  (only {target['experts_per_token']} of {target['routed_experts']} routed experts run)

## Training

Next-token cross-entropy on the training split, windows of {target['train']['seq_len']} tokens.
{_recipe(target['train'])}
## Evaluation

Held-out loss: **{target['heldout_loss']:.4f} nats/token** (mean next-token cross-entropy over
the first {metrics['eval_tokens']} tokens of the held-out split, windows of
{target['train']['seq_len']} tokens).

{_common(metrics)}"""


def draft_card(metrics: dict[str, Any]) -> str:
    draft = metrics["draft"]
    return f"""# dspark-ray reference draft (Llama, {draft['total_params'] / 1e6:.1f}M)

A small dense **draft** LM for classic speculative decoding against the dspark-ray reference
target. It shares the target's tokenizer and vocabulary and was distilled from it.

## Architecture

{draft['architecture']}

- parameters: **{draft['total_params']:,}** (input and output embeddings tied)

## Training

Distillation: KL(target || draft) on the target's next-token distributions, computed on the
fly with the target frozen, plus {draft['ce_weight']} x cross-entropy on the data.
{_recipe(draft['train'])}
## Evaluation

On the first {metrics['eval_tokens']} held-out tokens:

- held-out loss: **{draft['heldout_loss']:.4f} nats/token** (target: {metrics['target']['heldout_loss']:.4f})
- top-1 agreement with the target's greedy next token: **{draft['agreement']:.1%}** (a
  predictor of greedy speculative acceptance)
{_sweep(metrics.get('draft_sweep', []))}
{_common(metrics)}"""


def write_cards(out: Path, metrics: dict[str, Any]) -> None:
    """Write `<out>/target/README.md` and `<out>/draft/README.md`."""
    (out / "target" / "README.md").write_text(target_card(metrics), encoding="utf-8")
    (out / "draft" / "README.md").write_text(draft_card(metrics), encoding="utf-8")
