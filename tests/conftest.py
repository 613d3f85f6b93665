"""Shared test fixtures. Tests use fixed seeds and small randomly initialised models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
E2E_DIR = SHARED / "data" / "e2e"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def e2e_dir() -> Path:
    if not (E2E_DIR / "devset.csv").exists():
        pytest.skip(f"E2E data not found at {E2E_DIR}")
    return E2E_DIR


def tiny_gpt2(vocab_size: int = 128, n_layer: int = 2, n_embd: int = 32, n_head: int = 4):
    """A small randomly initialised GPT-2 (Conv1D layers, fused c_attn), eval mode, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=vocab_size - 1,
                        eos_token_id=vocab_size - 1, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int = 128, n_layer: int = 2, hidden: int = 32, heads: int = 4):
    """A small randomly initialised LLaMA-style decoder (SmolLM2's architecture), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layer, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_bert(vocab_size: int = 128, n_layer: int = 2, hidden: int = 32, heads: int = 4,
              num_labels: int = 2):
    """A small randomly initialised BERT sequence classifier (MiniLM's architecture)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def save_tiny_llama_inputs(work: Path, hidden: int, words: list[str]) -> Path:
    """`work` with a tiny random LLaMA (tied head, as SmolLM2) and the bundled GPT-2 tokenizer
    in `work/llama`, and a 160-passage corpus of `words` in `work/text.txt` (split 90/5/5 by
    loralab.data.tasks). Skips the test when the bundled tokenizer is not prepared."""
    import random

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loralab import bundled
    from loralab.errors import UserError

    try:
        tok_dir = bundled.gpt2_tokenizer_dir(build=False)
    except UserError as exc:
        pytest.skip(f"bundled GPT-2 tokenizer not prepared: {exc}")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden,
                                 intermediate_size=2 * hidden, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(work / "llama")
    tok.save_pretrained(work / "llama")
    rng = random.Random(2)
    (work / "text.txt").write_text("\n\n".join(
        " ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(160)))
    return work


# --- the report tests' recorded studies (fake runs), run and reported once per session ---------

@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """OUT of the recorded study (report_studies.STUDY) with its report written."""
    from loralab.report.write import write_report
    from loralab.study.runner import run_study
    from loralab.study.spec import parse_study
    from report_studies import STUDY, recorded_run

    out = tmp_path_factory.mktemp("rep")
    run_study(parse_study(STUDY), out, run_fn=recorded_run, progress=lambda m: None)
    write_report(out)
    return out


@pytest.fixture(scope="session")
def qbuilt(tmp_path_factory) -> Path:
    """OUT of the recorded quantization study (report_studies.QSTUDY) with its report."""
    from loralab.report.write import write_report
    from loralab.study.runner import run_study
    from loralab.study.spec import parse_study
    from report_studies import QSTUDY, quant_record

    out = tmp_path_factory.mktemp("q")
    run_study(parse_study(QSTUDY), out, run_fn=quant_record, progress=lambda m: None)
    write_report(out)
    return out


# --- shared by several test packages -------------------------------------------------------------

def randomise_adapters(model, std: float = 0.05) -> None:
    """Give every LoRA factor random values (a fresh B is zero: the adapter would be a no-op)."""
    from loralab.lora.inject import lora_parameters

    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, std)


def token_ids(n: int = 2, t: int = 10) -> dict:
    """A fixed (n, t) batch of token ids below the tiny models' vocabulary of 128."""
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 128, (n, t), generator=g)}


@pytest.fixture(scope="module")
def gpt2():
    """The bundled GPT-2 tokenizer."""
    from loralab.models.loading import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def minilm():
    """The bundled MiniLM-L6 tokenizer."""
    from loralab.models.loading import load_tokenizer

    return load_tokenizer("minilm-l6")
