"""Tiny local models for tests: built in-process in about a second, never downloaded.

`build_tiny_model` writes a 2-layer GPT-2 with a byte-level BPE tokenizer trained on a built-in
corpus, saved as safetensors. `build_pickle_only_model` and `build_remote_code_model` write the
kinds of directory a loader must refuse or treat with suspicion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
REMOTE_CODE_MARKER = "REMOTE_CODE_RAN"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTEXT_TOKENS = 256

_CORPUS = """
The quick brown fox jumps over the lazy dog. A model serves text to people who ask for it.
What is the capital of France? Paris is the capital of France. Berlin is the capital of Germany.
The control plane starts an instance, proxies requests to it, and stops it when nobody uses it.
Tokens are generated one at a time; a batch lets several requests share each step of the model.
She sells sea shells by the sea shore. How much wood would a woodchuck chuck if it could?
Once upon a time there was a small language model that wanted to learn every word in English.
It read books, letters, newspapers and recipes: bread, butter, salt, sugar, flour and water.
Numbers matter too: one, two, three, four, five, six, seven, eight, nine, ten, 2024, 3.14.
Hello world! Good morning, good evening, good night. Thank you very much, you are welcome.
Café, naïve, résumé, jalapeño, über, smörgåsbord: some words carry accents and other marks.
"""


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    core.train_from_iterator(lines * 4, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=CONTEXT_TOKENS,
    )


def build_tiny_model(dest: Path, *, chat_template: bool = True) -> Path:
    """Write a tiny deterministic GPT-2 and its tokenizer to `dest` (safetensors); return `dest`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _train_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE  # type: ignore[attr-defined]
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)  # type: ignore[attr-defined]
    config = GPT2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        n_positions=CONTEXT_TOKENS,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(config)
    dest.mkdir(parents=True, exist_ok=True)
    # transformers 5 always writes safetensors.
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)  # type: ignore[attr-defined]
    return dest


def build_pickle_only_model(dest: Path) -> Path:
    """Write a tiny model whose weights are only a pickle `pytorch_model.bin`; return `dest`."""
    import torch
    from safetensors.torch import load_file

    build_tiny_model(dest)
    weights = dest / "model.safetensors"
    torch.save(load_file(str(weights)), dest / "pytorch_model.bin")
    weights.unlink()
    return dest


def build_remote_code_model(dest: Path) -> Path:
    """Write a tiny model whose config asks for custom code that would leave a marker file.

    The marker is `dest / REMOTE_CODE_MARKER`; a safe loader never creates it.
    """
    build_tiny_model(dest)
    marker = (dest / REMOTE_CODE_MARKER).resolve()
    code = (
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class EvilConfig(GPT2Config):\n"
        "    model_type = 'gpt2'\n"
        "class EvilModel(GPT2LMHeadModel):\n"
        "    config_class = EvilConfig\n"
    )
    (dest / "evil.py").write_text(code)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config_path.write_text(json.dumps(config, indent=2))
    tokenizer_config_path = dest / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilConfig", None]}
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return dest


def copy_model(source: Path, dest: Path) -> Path:
    """Copy a built model directory, so a test may alter its copy."""
    shutil.copytree(source, dest)
    return dest


def build_tiny_encoder(dest: Path) -> Path:
    """Write a tiny random BERT encoder with a word-piece vocabulary to `dest` (safetensors).

    Its config names `BertModel`, so the agent serves it for feature extraction, as it does
    all-MiniLM-L6-v2.
    """
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.lower() for w in re.findall(r"\w+|[^\w\s]", _CORPUS)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(  # type: ignore[no-untyped-call]
        vocab_file=str(dest / "vocab.txt"), do_lower_case=True, model_max_length=CONTEXT_TOKENS
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT_TOKENS,
        pad_token_id=0,
    )
    torch.manual_seed(1234)
    model = BertModel(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


WHISPER_LANGUAGES = ("en", "de", "fr", "es")


def build_tiny_whisper(dest: Path) -> Path:
    """A 1-layer random Whisper (safetensors) with a feature extractor and a tokenizer trained
    here, carrying Whisper's special tokens after the BPE vocabulary as the real one does, and a
    generation config that knows its languages and tasks: the text is noise, every step real."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    dest.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    core.train_from_iterator(lines * 4, trainer=trainer)
    vocab = core.get_vocab()
    merges = [tuple(pair) for pair in json.loads(core.to_str())["model"]["merges"]]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, pad_token=EOS_TOKEN)
    languages = [f"<|{code}|>" for code in WHISPER_LANGUAGES]
    specials = [
        "<|startoftranscript|>",
        *languages,
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    eos = tokenizer.eos_token_id
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        d_model=32,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos,
        pad_token_id=eos,
        is_multilingual=True,
        lang_to_id={t: ids[t] for t in languages},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[eos],
    )
    model.save_pretrained(dest)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    processor.save_pretrained(dest)
    return dest
