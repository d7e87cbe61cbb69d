"""Tiny RANDOM image-to-music helpers in the Hugging Face layout: a BLIP captioner and an instruction-tuned
causal LM (the prompt writer), the same classes the real checkpoints load through.

- BLIP: `BlipForConditionalGeneration` (a 1-layer ViT on 32x32 images, a 1-layer BERT decoder) with a
  `BlipProcessor` = `BlipImageProcessor` + a `BertTokenizer` built from a word list (with BLIP's `[DEC]` bos).
- Writer: `Qwen2ForCausalLM` (as Qwen2.5-0.5B-Instruct) with a word-level tokenizer built offline and a
  ChatML chat template (`<|im_start|>role ... <|im_end|>`), so `apply_chat_template` and `generate` run the
  real code path. Its vocabulary is music words, so its random output reads like a (nonsensical) prompt.

Random weights: captions and prompts are word salad, but they depend on the image / text and the seed
exactly as the real models' do, which is what the tests check."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_MARKER = "TINY_RANDOM_WEIGHTS"
CAPTIONER_FOLDER = "blip-image-captioning-base"
WRITER_FOLDER = "qwen2.5-0.5b-instruct"

_SCENE_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "at", "people", "man", "woman", "child", "dog",
                "cat", "beach", "ocean", "city", "street", "night", "forest", "tree", "mountain", "snow", "sunset",
                "sky", "car", "rain", "flowers", "field", "room", "dancing", "crowd", "playing", "standing",
                "sitting", "red", "blue", "green", "white", "black", "lights", "water", "boat", "road", "house"]
_MUSIC_WORDS = ["upbeat", "calm", "dreamy", "melancholic", "energetic", "warm", "dark", "bright", "jazz", "lofi",
                "ambient", "folk", "rock", "house", "techno", "cinematic", "orchestral", "piano", "guitar",
                "strings", "synth", "drums", "bass", "saxophone", "flute", "pads", "beat", "groove", "slow",
                "fast", "mid-tempo", "bpm", "70", "90", "110", "124", "140", "with", "and", "a", "of", "music",
                "melody", "soft", "driving", "acoustic", "electronic", "mood", "tempo"]


def _blip_tokenizer():
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for w in _SCENE_WORDS:
        vocab.setdefault(w, len(vocab))
    vocab["[DEC]"] = len(vocab)  # BLIP's decoder bos, a special token as in the real tokenizer
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)


def build_captioner(seed: int = 0):
    """(model, processor): a tiny random BlipForConditionalGeneration and its BlipProcessor."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    tok = _blip_tokenizer()
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                          bos_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id,
                          sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=32))
    _variance_preserving(model, seed)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return model.eval(), BlipProcessor(image_processor=image_processor, tokenizer=tok)


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _writer_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in _MUSIC_WORDS + _SCENE_WORDS + ["system", "user", "assistant", ",", "."]:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"],
                                  model_max_length=512)
    tok.chat_template = CHATML
    return tok


def build_writer(seed: int = 0):
    """(model, tokenizer): a tiny random Qwen2ForCausalLM with a ChatML tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _writer_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _variance_preserving(model, seed)
    gen = model.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.do_sample = True
    return model.eval(), tok


def _variance_preserving(model, seed: int) -> None:
    """HF's std-0.02 init makes a 32-wide random model ignore its input; unit-variance weights make the output
    depend on the image / text, as in a trained model."""
    g = torch.Generator().manual_seed(seed + 777)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=g)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 1.0 / module.in_features ** 0.5, generator=g)
            elif isinstance(module, torch.nn.Conv2d):  # BLIP's patch embedding
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, 1.0 / fan_in ** 0.5, generator=g)
        for name, param in model.named_parameters():  # BLIP's class / position embeddings (init ~1e-10)
            if name.endswith(("class_embedding", "position_embedding")) and param.dim() == 3:
                param.normal_(0.0, 0.5, generator=g)


def _mark(directory: Path) -> Path:
    (directory / TINY_MARKER).write_text("Random weights for tests: captions and prompts are word salad.\n")
    return directory


def _save(directory: Path, model, processor) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return _mark(directory)


def write_captioner(directory: Path, seed: int = 0) -> Path:
    return _save(directory, *build_captioner(seed))


def write_writer(directory: Path, seed: int = 0) -> Path:
    return _save(directory, *build_writer(seed))


def write_all(root: Path) -> list[Path]:
    """The tiny captioner and prompt writer under root/<folder>/ (the folders lib.catalog names)."""
    root = Path(root)
    return [write_captioner(root / CAPTIONER_FOLDER, seed=200), write_writer(root / WRITER_FOLDER, seed=201)]
