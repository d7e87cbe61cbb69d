"""cog-music: one Predictor, every engine. Inputs are declared in lib/params.py (one source of truth);
the work is in lib/service.py."""
from typing import Optional

from cog import BasePredictor, Path

from lib.params import PARAMS as P
from lib.request import Request


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        from lib.service import Service

        self.service = Service(weights_dir=weights)

    def predict(
        self,
        prompt: Optional[str] = P["prompt"].input(),
        input_audio: Optional[Path] = P["input_audio"].input(),
        duration: float = P["duration"].input(),
        continuation: bool = P["continuation"].input(),
        continuation_start: float = P["continuation_start"].input(),
        continuation_end: Optional[float] = P["continuation_end"].input(),
        multi_band_diffusion: bool = P["multi_band_diffusion"].input(),
        replicate_weights: Optional[str] = P["replicate_weights"].input(),
        normalization_strategy: str = P["normalization_strategy"].input(),
        top_k: int = P["top_k"].input(),
        top_p: float = P["top_p"].input(),
        temperature: float = P["temperature"].input(),
        classifier_free_guidance: float = P["classifier_free_guidance"].input(),
        output_format: str = P["output_format"].input(),
        seed: Optional[int] = P["seed"].input(),
        model_version: str = P["model_version"].input(),
        task: str = P["task"].input(),
        lyrics: Optional[str] = P["lyrics"].input(),
        negative_prompt: Optional[str] = P["negative_prompt"].input(),
        num_inference_steps: Optional[int] = P["num_inference_steps"].input(),
        guidance_scale: Optional[float] = P["guidance_scale"].input(),
        shift: Optional[float] = P["shift"].input(),
        bpm: Optional[int] = P["bpm"].input(),
        keyscale: Optional[str] = P["keyscale"].input(),
        timesignature: Optional[int] = P["timesignature"].input(),
        vocal_language: Optional[str] = P["vocal_language"].input(),
        repainting_start: float = P["repainting_start"].input(),
        repainting_end: Optional[float] = P["repainting_end"].input(),
        audio_cover_strength: float = P["audio_cover_strength"].input(),
        track_name: Optional[str] = P["track_name"].input(),
        strength: Optional[float] = P["strength"].input(),
        image: Optional[Path] = P["image"].input(),
        enhance_prompt: bool = P["enhance_prompt"].input(),
    ) -> Path:
        inputs = dict(locals())
        inputs.pop("self")
        return Path(self.service.predict(Request.from_inputs(**inputs)))
