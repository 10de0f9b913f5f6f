"""The ``transformers`` router backend: a local MedGemma-class VLM answers the router's stages.

Per stage it reads the model's first-token distribution from one prefill, keeps the top-2 first
tokens and decodes a greedy answer from each (the paper's method; ``p_i`` is the first token's
probability), or, with ``answer_mode="options"``, scores every admissible answer by its
full-sequence likelihood. Stages 1–2 show the image; stage 3 masks it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from onevlm import __version__
from onevlm.imaging.dicom_to_image import ImageConversionError, load_image
from onevlm.inputs.routing_input import RoutingInput
from onevlm.router.backend import NONE, BackendError, Candidate, Consultation, StageRequest, StageResponse
from onevlm.router.prompts import StagePrompt
from onevlm.vlm.engine import Branch, FastEngine, ModelAdapter, NaiveEngine, PromptTokens
from onevlm.vlm.loading import LoadedModel, LoadOptions, ModelLoadError, load_model

logger = logging.getLogger(__name__)

#: Answer length bound per stage (tokens): a modality string, a finding, an ID + justification.
MAX_NEW_TOKENS = {1: 24, 2: 16, 3: 48}
ENGINES = ("fast", "naive", "graph")
ANSWER_MODES = ("free", "options")
#: Stages whose admissible set is closed (stage 2's finding is open-ended: free text always).
OPTION_STAGES = (1, 3)
FEATURE_CACHE_SIZE = 64
#: The end of every prompt (Gemma 3's generation prompt): the model's answer follows it.
MODEL_TURN_OPENING = "<start_of_turn>model\n"
#: Stages 1-2 show the model the image; stage 3 masks it (a text-only call).
PIXELS_READ = Consultation(("pixels",), "the transformers router reads the pixels only (the header is not used)",
                           vlm_calls=1)
IMAGE_MASKED = Consultation((), "text only: the VLM chooses among the cards' captions with the image masked",
                            vlm_calls=1)


@dataclass(frozen=True)
class EngineSettings:
    """How the backend decodes: engine, answer mode and per-stage answer length."""

    engine: str = "fast"
    answer_mode: str = "free"
    max_new_tokens: tuple[int, int, int] = (MAX_NEW_TOKENS[1], MAX_NEW_TOKENS[2], MAX_NEW_TOKENS[3])
    #: The graph engine's ``torch.compile`` mode (:data:`onevlm.vlm.graph_engine.COMPILE_MODES`).
    graph_compile: str = "auto"

    def __post_init__(self) -> None:
        from onevlm.vlm.graph_engine import COMPILE_MODES

        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.graph_compile not in COMPILE_MODES:
            raise ValueError(f"graph_compile must be one of {', '.join(COMPILE_MODES)}, got {self.graph_compile!r}")
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {self.answer_mode!r}")
        if any(n < 1 for n in self.max_new_tokens):
            raise ValueError("max_new_tokens must be at least 1 per stage")


class PromptBuilder:
    """Stage prompts through the model's own chat template (Gemma 3 folds the system turn in)."""

    def __init__(self, processor, image_token_id: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.boi_token = getattr(processor, "boi_token", None)
        self.full_image_sequence = getattr(processor, "full_image_sequence", None)
        if self.boi_token is None or self.full_image_sequence is None:
            raise ModelLoadError(
                f"{type(processor).__name__}: the engine needs a Gemma 3-style processor "
                "(boi_token and full_image_sequence), as MedGemma's"
            )
        self._end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        self._turn_opening_ids = self.tokenizer(MODEL_TURN_OPENING, add_special_tokens=False)["input_ids"]
        self._option_ids: dict[str, tuple[int, ...]] = {}

    def text(self, prompt: StagePrompt) -> str:
        user: list[dict[str, str]] = [{"type": "text", "text": prompt.user}]
        if prompt.uses_image:
            user.insert(0, {"type": "image"})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": prompt.system}]},
            {"role": "user", "content": user},
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def tokens(self, prompt: StagePrompt) -> PromptTokens:
        """Token ids with the image placeholder expanded to the processor's image sequence."""
        text = self.text(prompt)
        if prompt.uses_image:
            if text.count(self.boi_token) != 1:
                raise ValueError("the chat template must place exactly one image")
            text = text.replace(self.boi_token, self.full_image_sequence)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        mask = tuple(i == self.image_token_id for i in ids)
        if not prompt.uses_image and any(mask):
            raise ValueError("a text-only prompt contains image tokens")
        return PromptTokens(tuple(ids), mask)

    def option_tokens(self, answer: str) -> tuple[int, ...]:
        """An admissible answer as the model would write it after the prompt, ending the turn.

        A subword tokenizer may split text differently at the start of a string than after the
        prompt (a dummy prefix, a merge across the boundary), so the answer is tokenised after
        the prompt's last line (the model turn's opening) and that line's pieces removed; the
        answer alone is the fallback when the two do not line up.
        """
        if answer in self._option_ids:  # the same admissible answers come back for every input
            return self._option_ids[answer]
        prefix = self._turn_opening_ids
        full = self.tokenizer(MODEL_TURN_OPENING + answer, add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] == prefix and len(full) > len(prefix):
            ids = tuple(full[len(prefix):])
        else:
            ids = tuple(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        ids += (self._end_of_turn,) if isinstance(self._end_of_turn, int) and self._end_of_turn >= 0 else ()
        self._option_ids[answer] = ids
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


class TransformersBackend:
    """Router backend over a local image-text-to-text model (MedGemma-4B-it is the reference).

    Parameters
    ----------
    loaded:
        The model and processor from :func:`onevlm.vlm.loading.load_model`.
    settings:
        Engine (``fast``, ``naive`` or ``graph``), answer mode (``free`` or ``options``), answer lengths.
    """

    name = "transformers"

    def __init__(self, loaded: LoadedModel, settings: EngineSettings | None = None) -> None:
        self.loaded = loaded
        self.settings = settings or EngineSettings()
        model, processor = loaded.model, loaded.processor
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None or not hasattr(model, "get_image_features"):
            raise ModelLoadError(f"{loaded.identity['model_dir']}: the engine needs a Gemma 3-style VLM (image token + get_image_features)")
        self.prompts = PromptBuilder(processor, image_token_id)
        eos = model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        end_of_turn = processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn not in eos_ids and end_of_turn != processor.tokenizer.unk_token_id:
            eos_ids.append(end_of_turn)
        pad = processor.tokenizer.pad_token_id
        self.adapter = ModelAdapter(model, eos_ids, pad if pad is not None else eos_ids[0], image_token_id)
        if self.settings.engine == "graph":
            from onevlm.vlm.graph_engine import GraphEngine

            self.engine = GraphEngine(self.adapter, self.settings.graph_compile)
        elif self.settings.engine == "fast":
            self.engine = FastEngine(self.adapter)
        else:
            self.engine = NaiveEngine(self.adapter)
        self._pixels: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._features: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_options(
        cls,
        model_dir: str,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "none",
        attn_implementation: str = "sdpa",
        engine: str = "fast",
        answer_mode: str = "free",
        **_: Any,
    ) -> "TransformersBackend":
        """Load ``model_dir`` and build the backend (the CLI's ``--backend transformers``)."""
        loaded = load_model(model_dir, LoadOptions(device=device, dtype=dtype, quantize=quantize,
                                                   attn_implementation=attn_implementation))
        return cls(loaded, EngineSettings(engine=engine, answer_mode=answer_mode))

    def warm_up(self) -> None:
        """The model is loaded in the constructor; nothing more to load."""

    def identity(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "onevlm_version": __version__,
            **self.loaded.identity,
            "engine": self.settings.engine,
            "answer_mode": self.settings.answer_mode,
            "max_new_tokens": list(self.settings.max_new_tokens),
        }

    # -- the router's entry point -------------------------------------------------------------

    def answer(self, items: Sequence[RoutingInput], requests: Sequence[StageRequest]) -> list[StageResponse]:
        responses: list[StageResponse | None] = [None] * len(items)
        todo: list[int] = []
        for i, (item, request) in enumerate(zip(items, requests)):
            kind = item.header.non_image_kind if item.header is not None else None
            if kind and request.stage == 1:
                # No pixels to show the model: an SR, RT plan or ECG is not a medical image.
                responses[i] = StageResponse(
                    (Candidate(NONE, 1.0),),
                    {"method": "sop-class", "non_image": kind, "model_called": False, "pixels_read": False},
                    distribution={NONE: 1.0},
                    consultation=Consultation(("header",), f"no pixels to show the model: the SOP class says {kind}"),
                )
            else:
                todo.append(i)
        for stage in sorted({requests[i].stage for i in todo}):
            group = [i for i in todo if requests[i].stage == stage]
            for i, response in zip(group, self._answer_stage([items[i] for i in group], [requests[i] for i in group])):
                responses[i] = response
        return [r for r in responses if r is not None]

    def _answer_stage(self, items: list[RoutingInput], requests: list[StageRequest]) -> list[StageResponse]:
        stage = requests[0].stage
        uses_image = requests[0].prompt.uses_image
        prompts = [self.prompts.tokens(r.prompt) for r in requests]
        evidence = {
            "method": "vlm-options-likelihood" if self._options(stage) else "vlm-top2-first-token",
            "engine": self.settings.engine,
            "pixels_read": uses_image,
            "image_masked": not uses_image,
            "prompt_tokens": [len(p.input_ids) for p in prompts],
        }
        consultation = PIXELS_READ if uses_image else IMAGE_MASKED
        if self._options(stage):
            return [self._options_response(item, request, prompt, evidence, consultation)
                    for item, request, prompt in zip(items, requests, prompts)]
        max_new = self.settings.max_new_tokens[stage - 1]
        if isinstance(self.engine, FastEngine):
            visual = self._image_features(items) if uses_image else [None] * len(items)
        else:
            visual = self._pixel_values(items) if uses_image else [None] * len(items)
        results = self.engine.top2(prompts, visual, max_new)
        return [self._free_response(branches, {**evidence, "max_new_tokens": max_new, "prompt_tokens": len(prompt.input_ids)},
                                    consultation)
                for branches, prompt in zip(results, prompts)]

    def _options(self, stage: int) -> bool:
        return self.settings.answer_mode == "options" and stage in OPTION_STAGES

    def _free_response(self, branches: list[Branch], evidence: dict, consultation: Consultation) -> StageResponse:
        candidates = tuple(
            Candidate(text=self.prompts.decode(b.token_ids), p=min(b.first_token_p, 1.0), sequence_logprob=b.sequence_logprob)
            for b in branches
        )
        return StageResponse(candidates, evidence, consultation=consultation)

    def _options_response(self, item: RoutingInput, request: StageRequest, prompt: PromptTokens, evidence: dict,
                          consultation: Consultation) -> StageResponse:
        options = list(request.allowed)
        option_ids = [self.prompts.option_tokens(o) for o in options]
        if isinstance(self.engine, NaiveEngine):
            pixels = self._pixel_values([item])[0] if request.prompt.uses_image else None
            scored = self.engine.score_options(prompt, pixels, option_ids)
        else:
            features = self._image_features([item])[0] if request.prompt.uses_image else None
            scored = self.engine.score_options(prompt, features, option_ids)
        top = sorted(scored, key=lambda s: -s.p)[:2]
        candidates = tuple(Candidate(options[s.index], min(s.p, 1.0), s.sequence_logprob) for s in top)
        total = sum(s.p for s in scored)
        distribution = {options[s.index]: s.p / total if total > 1.0 else s.p for s in scored}
        return StageResponse(candidates, {**evidence, "prompt_tokens": len(prompt.input_ids), "options": len(options)},
                             distribution=distribution, consultation=consultation)

    # -- images: preprocessed once, encoded once (fast engine) -----------------------------------

    @staticmethod
    def _key(item: RoutingInput) -> tuple:
        stat = item.path.stat()
        return (str(item.path.resolve()), stat.st_mtime_ns, stat.st_size)

    def _pixel_values(self, items: Sequence[RoutingInput]) -> list[torch.Tensor]:
        out = []
        for item in items:
            key = self._key(item)
            if key not in self._pixels:
                try:
                    image = load_image(item)
                except ImageConversionError as exc:
                    raise BackendError(str(exc)) from exc
                batch = self.loaded.processor.image_processor(images=[image], return_tensors="pt")
                self._pixels[key] = batch["pixel_values"]
                while len(self._pixels) > FEATURE_CACHE_SIZE:
                    self._pixels.popitem(last=False)
            self._pixels.move_to_end(key)
            out.append(self._pixels[key])
        return out

    @torch.inference_mode()
    def _image_features(self, items: Sequence[RoutingInput]) -> list[torch.Tensor]:
        keys = [self._key(item) for item in items]
        missing = [i for i, k in enumerate(keys) if k not in self._features]
        if missing:
            pixels = self._pixel_values([items[i] for i in missing])
            features = self.adapter.image_features(torch.cat(pixels))
            for i, feature in zip(missing, features):
                self._features[keys[i]] = feature.unsqueeze(0)
            while len(self._features) > FEATURE_CACHE_SIZE:
                self._features.popitem(last=False)
        for key in keys:
            self._features.move_to_end(key)
        return [self._features[k] for k in keys]
