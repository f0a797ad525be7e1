"""Reading the output of one decoder layer (RMU and embed_diff work on hidden states, not logits).

A forward hook on decoder layer ``l`` captures its output; by default the forward then stops (a
private exception raised from the hook), so layers after ``l``, the final norm and the LM head are
never computed. The early exit is skipped when the model is wrapped by DDP, FSDP or DeepSpeed
ZeRO-3, whose own hooks must see every forward run to completion. transformers checkpoints a layer's
``forward`` (not ``__call__``), so the hook sits outside gradient checkpointing and sees a tensor
connected to the graph.
"""

from __future__ import annotations

from torch import Tensor, nn

from retainfirst.errors import RetainFirstError


class _StopForward(Exception):
    """Raised from the capture hook to end a forward pass once the wanted layer has run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of an HF causal LM (plain, PEFT-wrapped or accelerate-wrapped).

    Looks for the longest ``nn.ModuleList`` whose name ends in ``layers``/``h``/``blocks`` (Llama,
    Mistral, Qwen: ``model.layers``; GPT-2: ``transformer.h``).
    """
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        is_stack = isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
        if is_stack and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise RetainFirstError(
            f"could not find the decoder layers of {type(model).__name__} (no ModuleList named "
            "'layers', 'h' or 'blocks'); hidden-state objectives (rmu, embed_diff) need a decoder-only LM"
        )
    return best


def check_layer(model: nn.Module, layer: int, what: str) -> None:
    """Clear error for a layer index the model does not have."""
    count = len(decoder_layers(model))
    if not 0 <= layer < count:
        raise RetainFirstError(f"{what}: layer {layer} does not exist; the model has layers 0..{count - 1}")


def _must_finish_forward(model: nn.Module) -> bool:
    """True under DDP, FSDP (1 or 2) or ZeRO-3: aborting their forward would skip the reshard hooks
    or the reducer's preparation for backward (silently unsynchronised gradients)."""
    for module in model.modules():
        name = type(module).__name__
        if name in ("FullyShardedDataParallel", "DistributedDataParallel") or name.startswith("FSDP"):
            return True
    return any(hasattr(p, "ds_status") for p in model.parameters())


def layer_output(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int, *, early_exit: bool = True
) -> Tensor:
    """Hidden states [B, T, d] output by decoder layer ``layer`` (= ``hidden_states[layer + 1]``).

    Gradients flow as usual when called with grad enabled; the caller picks no_grad for references.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise RetainFirstError(f"layer {layer} does not exist; the model has layers 0..{len(layers) - 1}")
    stop = early_exit and not _must_finish_forward(model)
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _StopForward

    handle = layers[layer].register_forward_hook(capture)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RetainFirstError(
            f"decoder layer {layer} did not run in the forward pass of {type(model).__name__}"
        )
    # A layer can run twice (e.g. a wrapper re-entering forward); the first run is the real one.
    return captured[0]
