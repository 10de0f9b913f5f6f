"""What one decode step of a Gemma 3 VLM reads from memory: the one definition behind the benchmarks' floor.

A decode step runs the text model on one new token per row, so it reads every text weight once (whatever the
batch), and nothing of the vision tower or the projector (the image was encoded at prefill). Of the input
embedding, the lookup reads one row per token, not the matrix; the output layer reads its whole matrix. Gemma 3
ties the two, so the tied matrix (262,208 × 2560 at medgemma-4b-it's shape: 671 M weights, 1.34 GB in bf16) is
read in full every step, by the output layer. The KV cache and the activations are not counted: the bytes are a
lower bound, and bytes / memory bandwidth is the floor a decode step cannot beat.

Used by ``bench/vocabulary_facts.py`` (the 4B shape on the meta device, counted in bf16) and
``bench/router_bench.py`` (the loaded model, in its own storage: bf16, float32 or NF4-packed), whose JSON
``decode_step_bytes`` ``bench/gpu_check.sh`` divides by the GPU's bandwidth.
"""

from __future__ import annotations

#: Parameter-name parts of the parts a decode step does not run.
NOT_DECODED = ("vision_tower", "multi_modal_projector")


def _storage_bytes(param) -> int:
    """Bytes the parameter occupies as stored (bitsandbytes' packed 4-bit data plus its quantisation constants)."""
    size = param.numel() * param.element_size()
    state = getattr(param, "quant_state", None)
    while state is not None:  # NF4 with double quantisation: absmax (uint8) + the nested state's float32 absmax
        absmax = getattr(state, "absmax", None)
        if absmax is not None:
            size += absmax.numel() * absmax.element_size()
        state = getattr(state, "state2", None)
    return size


def decode_step_reads(model) -> dict:
    """Weights and bytes one decode step reads (see the module's docstring for what counts).

    Parameters
    ----------
    model:
        A ``Gemma3ForConditionalGeneration`` (or any model with input and output embeddings whose
        vision parts are named as in :data:`NOT_DECODED`), on any device, ``meta`` included.

    Returns
    -------
    dict
        ``parameters`` (unique weights of the whole model as stored), ``text_parameters``,
        ``decoded_parameters`` (weights read per step: every text weight, of an untied input embedding one
        row), ``decode_step_bytes`` (those, in their storage), ``output_layer_parameters`` (vocabulary rows ×
        hidden), ``vocabulary_rows``, ``tied_output_layer`` and ``output_layer_share_of_decode_step`` (of the
        weights read).
    """
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    tied = output is embedding
    total = text = text_bytes = 0
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        total += param.numel()
        if not any(part in name for part in NOT_DECODED):
            text += param.numel()
            text_bytes += _storage_bytes(param)
    rows, hidden = embedding.shape
    row_bytes = _storage_bytes(embedding) // rows
    if tied:  # the output layer reads the whole matrix; the lookup's row comes on top
        decoded, step_bytes = text + hidden, text_bytes + row_bytes
    else:  # the lookup reads one row of its own matrix; the output layer is a text weight like any other
        decoded = text - embedding.numel() + hidden
        step_bytes = text_bytes - _storage_bytes(embedding) + row_bytes
    return {
        "parameters": total,
        "text_parameters": text,
        "decoded_parameters": decoded,
        "decode_step_bytes": step_bytes,
        "output_layer_parameters": output.numel(),
        "vocabulary_rows": output.shape[0],
        "tied_output_layer": tied,
        "output_layer_share_of_decode_step": output.numel() / decoded,
    }
