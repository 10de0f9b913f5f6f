"""Synthetic image-text-to-text models, built offline, with MedGemma's architecture (Gemma 3).

No weights can be downloaded here, so tests and benchmarks use complete model folders written
by :func:`build_synthetic_model`: a ``Gemma3ForConditionalGeneration`` config and random
weights, a tokenizer built with ``tokenizers`` whose vocabulary covers the router's prompts,
modality strings, findings and card IDs (word-level, every answer one token; or ``subword``, a
BPE vocabulary shaped like Gemma 3's where answers span several pieces), a Gemma 3 image
processor and a Gemma 3 chat template. The folder loads through the same ``AutoProcessor`` / ``AutoModelForImageTextToText``
path as a real MedGemma-4B-it checkout.

Sizes
-----
``tiny``
    Unit tests: under 1 MB, 64-wide layers (multiples of 64, so bitsandbytes NF4 works on CPU).
``small``
    CPU benchmark: about 25 M parameters, 224² images, 64 image tokens.
``medgemma-4b-shape``
    MedGemma-4B-it's real architecture: SigLIP-400M at 896² → 256 image tokens and the Gemma 3
    4B text model (34 layers, 2560 wide, vocabulary 262 208). Random weights, about 8.6 GB in
    bf16: for the GPU benchmark only, never built in CI.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from onevlm.cards.repository import CardRepository

logger = logging.getLogger(__name__)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_TOKEN]
NEWLINE = "\n"

#: Gemma 3's chat template: the system turn is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class SyntheticSize:
    """Architecture of one named synthetic size."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    head_dim: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    mm_tokens_per_image: int
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    sliding_window: int = 512
    initializer_range: float = 0.02
    dtype: str = "float32"


SIZES: dict[str, SyntheticSize] = {
    # Peaked random logits (larger init) keep greedy decoding away from float near-ties.
    "tiny": SyntheticSize(64, 128, 2, 2, 1, 32, 64, 128, 1, 2, 32, 8, 4, initializer_range=0.2, dtype="bfloat16"),
    "small": SyntheticSize(512, 2048, 4, 8, 4, 64, 384, 1536, 4, 6, 224, 14, 64, initializer_range=0.05),
    "medgemma-4b-shape": SyntheticSize(
        2560, 10240, 34, 8, 4, 256, 1152, 4304, 27, 16, 896, 14, 256,
        vocab_size=262_208, sliding_window=1024, dtype="bfloat16",
    ),
}

BASE_VOCABULARY = """
None Other Normal the a an of in and or to is it this that with for as on by at from be are was
user yes no not only one single answer scan image images medical model models select selected choose
fits fit matches match because best likely finding findings abnormality disease normal task
candidate candidates patient details primary modality modalities type list listed justification
""".split()


def corpus(cards: CardRepository) -> list[str]:
    """Every text the router can send or expect: prompts, modalities, findings, IDs, captions."""
    from onevlm.router import prompts

    texts = [prompts.SYSTEM_PROMPT, prompts.stage1_prompt(cards.modalities).user, prompts.stage2_prompt().user]
    for modality in cards.modalities:
        members = cards.by_modality(modality)
        texts.append(prompts.stage3_prompt(modality, "Normal", [(c.id, c.task_caption) for c in members]).user)
    texts += list(cards.modalities) + list(cards.findings) + [c.id + ": " + c.task_caption for c in cards]
    texts += BASE_VOCABULARY + [f"{i:02d}" for i in range(1000)] + [str(i) for i in range(10)]
    return texts


def answer_phrases(cards: CardRepository) -> list[str]:
    """Whole answers the router expects: modalities, findings, card IDs, None, Other, Normal."""
    return list(dict.fromkeys([*cards.modalities, *cards.findings, *(c.id for c in cards), "None", "Other", "Normal"]))


def build_tokenizer(texts: Iterable[str], phrases: Iterable[str] = ()):
    """A word-level fast tokenizer whose vocabulary covers ``texts`` exactly (decode is lossless).

    Each of ``phrases`` also becomes one token of its own, so that a random model's first token
    can be a whole admissible answer and every router path (in-set answers, stage 3) runs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab[NEWLINE] = len(vocab)
    for text in texts:
        for segment in text.split(NEWLINE):
            for piece, _ in pre.pre_tokenize_str(segment):
                vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Added tokens are matched before pre-tokenization, so "<start_of_turn>" and "\n" stay whole.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in phrases])
    return _fast_tokenizer(backend)


def _fast_tokenizer(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=131_072,
    )


TOKENIZERS = ("word", "subword", "gemma3")
#: Gemma 3's configured vocabulary (its tokenizer has 262,145 entries; the embedding has spare rows).
GEMMA3_VOCAB_SIZE = 262_208

#: Ordinary English (written for this module) so the subword vocabulary also holds everyday
#: pieces, as a real model's does, and not only the router's own words.
ENGLISH_TEXT = """
The imaging team starts the day by checking the worklist and the archive. Each study arrives from a
scanner, is stored, and waits for a reader. Some studies are urgent and some can wait until the
afternoon. A radiologist looks at the pictures, compares them with earlier ones, and writes a report
that the referring doctor reads later. When the report is ready, it goes back to the ward.
Computers help by sorting the queue, by measuring structures, and by pointing at areas that deserve a
second look. They are wrong sometimes, so every suggestion is checked by a person before anything is
decided. Good software says how sure it is, explains what it looked at, and asks for help when it does
not know. It keeps a record of every decision, so that a colleague can follow the reasoning afterwards.
Nurses, technologists and physicists each have their own tasks. The technologist positions the patient,
chooses the protocol, and makes sure the images are sharp. The physicist keeps the machines calibrated
and safe. Administrators keep the network running, watch the disks, and answer the phone when a
transfer fails in the middle of the night. Everybody wants the same thing: the right result, for the
right person, at the right time, without losing anything on the way.
Questions and answers: What kind of picture is this? It looks like a photograph of the chest. Which
part of the body is shown? The head, the hand, the knee, the abdomen or the lungs. Is there anything
unusual? There may be a shadow, a fracture, a mass, a bleed, or nothing at all. Please answer with one
of the listed options, and explain your choice in a short sentence.
"""


def build_subword_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A BPE fast tokenizer trained offline, shaped like Gemma 3's SentencePiece vocabulary.

    As in Gemma 3: no dummy prefix (a word at the start of a line has no ``▁``), spaces kept as
    ``▁`` on the following word, every digit a piece of its own (``MODEL_19`` is ``MODEL_``,
    ``1``, ``9``), newline a token, and the chat special tokens whole. Answers therefore span
    several pieces and answers that start alike ("brain CT scan", "brain MRI scan") share their
    first token, as they do for a real model.
    """
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    # Every printable character is in the alphabet, so any English answer tokenises without <unk>.
    alphabet = [c for c in string.printable if not c.isspace() or c == " "]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    lines = [segment for text in texts for segment in text.split(NEWLINE) if segment.strip()]
    backend.train_from_iterator(lines, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    return _fast_tokenizer(backend)


def synthetic_config(spec: SyntheticSize, tokenizer, vocab_size: int):
    """The ``Gemma3Config`` of a synthetic size, with the tokenizer's special-token ids."""
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    return Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            "vocab_size": vocab_size,
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.head_dim,
            "query_pre_attn_scalar": spec.head_dim,
            "sliding_window": spec.sliding_window,
            "max_position_embeddings": 131_072,
            "initializer_range": spec.initializer_range,
            "pad_token_id": ids(PAD),
            "bos_token_id": ids(BOS),
            "eos_token_id": [ids(EOS), ids(END_OF_TURN)],
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "vision_use_head": False,
        },
        mm_tokens_per_image=spec.mm_tokens_per_image,
        boi_token_index=ids(BOI),
        eoi_token_index=ids(EOI),
        image_token_index=ids(IMAGE_TOKEN),
        initializer_range=spec.initializer_range,
    )


def build_synthetic_model(
    size: str,
    out_dir: str | Path,
    cards: CardRepository | None = None,
    seed: int = 0,
    device: str = "cpu",
    tokenizer: str = "word",
    vocabulary_cache: str | Path | None = None,
) -> Path:
    """Write a complete, loadable synthetic model folder.

    Parameters
    ----------
    size:
        ``tiny``, ``small`` or ``medgemma-4b-shape``.
    out_dir:
        Target folder (created; existing model files are overwritten).
    cards:
        Card repository whose texts the tokenizer must cover (default: the shipped cards).
    seed:
        Seed for the random weights (same seed, same model on the same device).
    device:
        Where to initialise the weights (``cuda`` makes the 4B shape quick to build on a GPU).
    tokenizer:
        ``word`` (default: every admissible answer one token, the quickest for tests),
        ``subword`` (BPE shaped like Gemma 3's: answers span several pieces and share first tokens) or
        ``gemma3`` (Gemma 3's real vocabulary and chat template, fetched once:
        :mod:`onevlm.vlm.gemma3_vocabulary`; the output layer then has Gemma 3's 262,208 rows).
    vocabulary_cache:
        ``gemma3`` only: the cache folder holding the fetched vocabulary (default ``ONEVLM_CACHE_DIR``).

    Returns
    -------
    Path
        ``out_dir``.
    """
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cards is None:
        from onevlm.cards.repository import default_cards_dir

        cards = CardRepository.load(default_cards_dir())
    tokenizer_kind = tokenizer
    template = GEMMA3_CHAT_TEMPLATE
    if tokenizer_kind == "gemma3":
        from onevlm.vlm.gemma3_vocabulary import chat_template, load_tokenizer, require_vocabulary

        folder = require_vocabulary(vocabulary_cache)  # a clear error, saying how to fetch it, when missing
        tokenizer = load_tokenizer(folder=folder)
        template = chat_template(folder=folder)
    elif tokenizer_kind == "subword":
        tokenizer = build_subword_tokenizer([*corpus(cards), ENGLISH_TEXT])
    else:
        tokenizer = build_tokenizer(corpus(cards), answer_phrases(cards))
    vocab_size = spec.vocab_size or (GEMMA3_VOCAB_SIZE if tokenizer_kind == "gemma3" else len(tokenizer))
    if vocab_size < len(tokenizer):
        raise ValueError("vocabulary smaller than the tokenizer")
    config = synthetic_config(spec, tokenizer, vocab_size)
    torch.manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config)
        # transformers initialises the vision->text projection to zeros (real checkpoints overwrite
        # it); a synthetic model left so would ignore its images entirely.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        torch.nn.init.normal_(projection, std=spec.vision_hidden ** -0.5)
        model = model.to(dtype)
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.eos_token_id = [ids(EOS), ids(END_OF_TURN)]
    model.generation_config.pad_token_id = ids(PAD)
    model.generation_config.bos_token_id = ids(BOS)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Gemma3ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=spec.mm_tokens_per_image,
    )
    processor.save_pretrained(out)
    (out / "onevlm_synthetic.json").write_text(
        json.dumps({"size": size, "seed": seed, "tokenizer": tokenizer_kind, "parameters": sum(p.numel() for p in model.parameters()),
                    "note": "random weights: for tests and benchmarks only"}, indent=2)
    )
    logger.info("wrote synthetic %s model to %s", size, out)
    return out
