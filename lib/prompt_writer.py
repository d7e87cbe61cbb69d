"""The prompt writer: turns an image caption, or a short user prompt, into a music description for a
text-to-music model (genre, mood, instruments, tempo).

Two writers with one interface:
- `LMWriter`: a small instruction-tuned causal LM (Qwen2.5-0.5B-Instruct by default; any chat model in the
  Hugging Face layout with a chat template loads the same way) through transformers' `generate`. Sampling is
  seeded by the request's seed inside a forked RNG: same seed, same prompt; the engines' RNG is untouched.
- `TemplateWriter`: no model, deterministic keyword rules (what PaddleMIX would do without its LLM).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

MAX_PROMPT_CHARS = 400  # what we hand to the music model; text encoders truncate long prompts anyway
MAX_NEW_TOKENS = 96

SYSTEM = ("You are a music producer who writes prompts for a text-to-music model. Answer with the prompt only: "
          "one sentence of at most 40 words naming the genre, the mood, the main instruments and the tempo in "
          "BPM. No lyrics, no explanations, no quotes.")
# One worked example steers small models (0.5B) toward the format better than instructions alone.
EXAMPLE_SCENE = "Scene: a quiet lake at dawn with mist over the water"
EXAMPLE_ANSWER = ("Calm ambient piece with soft felt piano, warm synth pads and gentle water textures, peaceful "
                  "and dreamy, 70 BPM.")


def scene_request(caption: str, hint: Optional[str]) -> str:
    text = f"Scene: {caption}"
    if hint:
        text += f"\nThe listener also asks for: {hint}"
    return text + "\nWrite the music prompt for this scene."


def rewrite_request(prompt: str) -> str:
    return (f"Short request: {prompt}\nRewrite it into a richer music prompt that keeps its intent (and any genre, "
            "instrument or tempo it names).")


def clean(text: str) -> str:
    """The first non-empty line of a model's answer, without labels, quotes or control characters."""
    text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(music\s+)?(prompt|description)\s*:\s*", "", line, flags=re.I)
    line = line.strip(" \"'`*")
    line = re.sub(r"\s+", " ", line)
    if len(line) > MAX_PROMPT_CHARS:
        cut = line[:MAX_PROMPT_CHARS]
        line = cut[:cut.rfind(" ")] if " " in cut else cut
    return line


# -- the template ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    keywords: tuple
    genre: str
    mood: str
    instruments: str
    bpm: int


STYLES = (  # first match wins; keywords are matched as whole words of the caption (plural 's' allowed)
    Style(("dance", "dancing", "party", "club", "concert", "crowd", "festival", "disco"), "house", "energetic",
          "four-on-the-floor drums, deep bass and bright synth stabs", 124),
    Style(("beach", "ocean", "sea", "wave", "surf", "island", "palm", "boat", "sail"), "tropical chill",
          "sunny, breezy", "acoustic guitar, marimba, light percussion and warm bass", 100),
    Style(("city", "street", "traffic", "building", "skyline", "car", "bus", "train", "neon"), "lo-fi hip hop",
          "urban, laid-back", "dusty drums, jazzy electric piano and mellow bass", 85),
    Style(("night", "moon", "star", "dark", "candle", "bar", "lounge"), "smooth jazz", "intimate, nocturnal",
          "brushed drums, upright bass, piano and muted trumpet", 90),
    Style(("forest", "tree", "wood", "mountain", "hill", "river", "lake", "field", "meadow", "garden", "flower"),
          "acoustic folk", "peaceful, pastoral", "fingerpicked guitar, flute, soft strings and light hand drums", 95),
    Style(("snow", "winter", "ice", "cold", "fog", "mist"), "ambient", "calm, wistful",
          "felt piano, glassy pads and soft bells", 70),
    Style(("rain", "storm", "cloud", "grey", "gray"), "ambient piano", "melancholic, reflective",
          "solo piano, rain textures and low cello", 72),
    Style(("sunset", "sunrise", "sky", "desert", "road", "highway"), "cinematic indie", "warm, nostalgic",
          "clean electric guitar, analog synths and steady drums", 105),
    Style(("dog", "cat", "puppy", "kitten", "child", "kid", "baby", "toy", "playground", "bird"), "playful pop",
          "cheerful, light", "ukulele, glockenspiel, hand claps and pizzicato strings", 115),
    Style(("sport", "soccer", "football", "running", "race", "skate", "bike", "surfing"), "rock", "driving, upbeat",
          "distorted guitars, punchy drums and bass", 140),
    Style(("food", "kitchen", "table", "cafe", "coffee", "restaurant", "cake"), "bossa nova", "cozy, relaxed",
          "nylon guitar, soft percussion, upright bass and flute", 110),
    Style(("guitar", "piano", "violin", "drum", "band", "stage", "microphone", "singer"), "live acoustic",
          "warm, intimate", "the instruments in the scene, played live with room ambience", 100),
    Style(("castle", "church", "temple", "statue", "museum", "painting", "ancient"), "orchestral", "majestic",
          "strings, french horns, choir and timpani", 80),
)
DEFAULT_STYLE = Style((), "cinematic ambient", "evocative", "piano, warm strings and soft synth pads", 90)


def _words(text: str) -> set:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return words | {w[:-1] for w in words if w.endswith("s")}


def style_for(text: str) -> Style:
    words = _words(text)
    return next((s for s in STYLES if words & set(s.keywords)), DEFAULT_STYLE)


class TemplateWriter:
    """Deterministic: the same caption (and hint) always gives the same prompt; the seed plays no part."""
    name = "template"

    def for_scene(self, caption: str, hint: Optional[str], seed: int) -> str:
        s = style_for(f"{caption} {hint or ''}")
        prompt = f"{s.mood} {s.genre} inspired by {caption.rstrip('.')}, with {s.instruments}, {s.bpm} BPM"
        if hint:
            prompt = f"{hint.rstrip('.')}; {prompt}"
        return clean(prompt[0].upper() + prompt[1:])


# -- the language model -----------------------------------------------------------------------------------

def writer_files_missing(folder: Path) -> list[str]:
    missing = [n for n in ("config.json", "tokenizer.json") if not (folder / n).is_file()]
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    return missing


class LMWriter:
    def __init__(self, name: str, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        self.name = name
        self.device = device
        # The tokenizer exactly as tokenizer.json describes it (AutoTokenizer would rebuild some model types'
        # tokenizers from their vocab); the chat template comes from the folder too.
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{folder} has no chat template: the prompt writer needs an instruction-tuned chat model")
        if device.type == "cuda" and dtype == torch.float16 and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16  # Qwen-style LMs overflow in fp16 more easily than in bf16
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device).eval()
        eos = {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id}
        self.eos = sorted(e for e in _flatten(eos) if e is not None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]

    def _chat(self, user: str, seed: int) -> str:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": EXAMPLE_SCENE + "\nWrite the music prompt for this scene."},
                    {"role": "assistant", "content": EXAMPLE_ANSWER},
                    {"role": "user", "content": user}]
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, top_k=50,
                                      repetition_penalty=1.05, max_new_tokens=MAX_NEW_TOKENS,
                                      eos_token_id=self.eos, pad_token_id=self.pad)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def for_scene(self, caption: str, hint: Optional[str], seed: int) -> str:
        return clean(self._chat(scene_request(caption, hint), seed))

    def rewrite(self, prompt: str, seed: int) -> str:
        return clean(self._chat(rewrite_request(prompt), seed))


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from v
        else:
            yield v
