"""Trace a module with torch.fx into a chain of blocks joined by single tensors, and build stage modules from it."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from lightning_cmp.errors import PartitionError

__all__ = ["Chain", "trace_chain"]

# Calls whose result is known not to be a tensor (sizes, dtypes, python numbers); used to reject such cut values.
_NON_TENSOR_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "item", "tolist", "stride", "element_size", "get_device"}
)
_NON_TENSOR_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"})
# Calls (methods or torch functions) returning a tuple of tensors, like ShuffleNet's ``x.chunk(2, dim=1)``: their
# elements are tensors, the tuple itself is no cut value.
_TUPLE_OPS = frozenset(
    {"chunk", "split", "tensor_split", "unbind", "split_with_sizes", "topk", "sort", "meshgrid", "broadcast_tensors"}
    | {"std_mean", "var_mean", "aminmax"}
)


def trace_chain(module: nn.Module, name: str = "model") -> Chain:
    """Trace ``module.forward`` with torch.fx and cut it into blocks joined by exactly one tensor.

    Standard ``torch.nn`` layers are leaves; other modules (residual blocks, a LightningModule's ``net``)
    are traced through, so a skip connection stays inside one block.

    Args:
        module: the module to split; its forward takes one tensor and returns one tensor.
        name: how error messages call the module (e.g. ``"model"`` or ``"model.net"``).

    Returns:
        The `Chain` of blocks; its stage modules share the parameters of ``module``.

    Raises:
        PartitionError: fx cannot trace the forward, or it does not map one tensor to one tensor.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
        >>> chain = trace_chain(net)
        >>> chain.num_blocks, chain.block_names
        (3, ['0', '1', '2'])
    """
    graph = _trace(module, name)
    _check_signature(graph, module, name)
    return Chain(module, graph, name)


class Chain:
    """A traced module cut into ``num_blocks`` blocks; block i's output is block i+1's only input.

    Examples:
        >>> chain = trace_chain(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))
        >>> first, second = chain.stage_module(0, 2), chain.stage_module(2, 3)
        >>> x = torch.randn(1, 4)
        >>> torch.equal(second(first(x)), chain.root(x))
        True
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, name: str) -> None:
        self.root = module
        self.name = name
        # get_attr nodes belong to no block: each stage re-reads the attributes it needs.
        self._nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        if not self._nodes:
            raise PartitionError(f"{name}.forward computes nothing; lightning_cmp needs at least one layer to split")
        self._bounds, self._carried = _find_cuts(graph, self._nodes, module)
        self.block_names = _block_names([self._block_nodes(i) for i in range(self.num_blocks)])

    @property
    def num_blocks(self) -> int:
        """How many blocks the chain has (cut points + 1)."""
        return len(self._bounds) - 1

    def __repr__(self) -> str:
        return f"Chain({self.name!r}, num_blocks={self.num_blocks}, blocks={self.block_names})"

    def stage_module(self, first_block: int, stop_block: int, root: nn.Module | None = None) -> fx.GraphModule:
        """An ``fx.GraphModule`` running blocks ``[first_block, stop_block)``: one tensor in, one tensor out.

        Submodules, parameters and buffers are shared with the traced module by reference, so training
        the stage trains the original. Only the attributes the stage uses are attached to it. ``root``: take them
        from another module with the same qualified names instead (a copy of a stage holding these blocks).

        Examples:
            >>> chain = trace_chain(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
            >>> stage = chain.stage_module(2, 3)
            >>> stage.get_submodule("2") is chain.root[2]
            True
        """
        self._check_range(first_block, stop_block)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {self._carried[first_block]: graph.placeholder("x")}
        for node in self._stage_nodes(first_block, stop_block):
            for attr in _get_attr_inputs(node):
                if attr not in env:
                    env[attr] = graph.node_copy(attr)
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(env[self._carried[stop_block]])
        graph.lint()
        return fx.GraphModule(
            self.root if root is None else root, graph, class_name=f"Stage_{first_block}_{stop_block}"
        )

    def stage_state_names(self, first_block: int, stop_block: int) -> tuple[list[str], list[str]]:
        """Qualified names (as in ``module.named_parameters()`` / ``named_buffers()``) the stage uses.

        Examples:
            >>> chain = trace_chain(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
            >>> chain.stage_state_names(1, 2)
            (['1.weight', '1.bias'], ['1.running_mean', '1.running_var', '1.num_batches_tracked'])
        """
        self._check_range(first_block, stop_block)
        used = {id(t) for t in self._stage_tensors(first_block, stop_block)}
        params = [n for n, p in self.root.named_parameters() if id(p) in used]
        buffers = [n for n, b in self.root.named_buffers() if id(b) in used]
        return params, buffers

    def check_cuts_share_nothing(self, cuts: Sequence[int]) -> None:
        """Raise if a parameter or buffer is used by two stages of the split ``cuts`` (e.g. tied weights).

        Examples:
            >>> lin = nn.Linear(4, 4)
            >>> chain = trace_chain(nn.Sequential(lin, nn.ReLU(), lin))
            >>> chain.check_cuts_share_nothing([1])
            Traceback (most recent call last):
            ...
            lightning_cmp.errors.PartitionError: parameter '0.weight' is used by stages 0 and 1 (tied weights); ...
        """
        bounds = [0, *cuts, self.num_blocks]
        owner: dict[str, int] = {}
        for stage in range(len(bounds) - 1):
            params, buffers = self.stage_state_names(bounds[stage], bounds[stage + 1])
            for kind, names in (("parameter", params), ("buffer", buffers)):
                for qualname in names:
                    if owner.setdefault(qualname, stage) != stage:
                        raise PartitionError(
                            f"{kind} {qualname!r} is used by stages {owner[qualname]} and {stage} (tied weights); "
                            f"choose cuts that keep its users in one stage (cuts={list(cuts)})"
                        )

    def forbidden_cuts(self) -> dict[int, str]:
        """Cut positions that would give one parameter or buffer to two stages, each with the reason.

        A module (or tensor) used by several blocks keeps all of them in one stage: `resolve_cuts` chooses no
        cut among these positions and refuses explicit cuts that do.

        Examples:
            >>> lin = nn.Linear(4, 4)
            >>> chain = trace_chain(nn.Sequential(lin, nn.ReLU(), lin, nn.Tanh()))
            >>> chain.forbidden_cuts()
            {1: "parameter '0.weight' is used by blocks 0 and 2 ('0', '0#1')", 2: "parameter '0.weight' ..."}
        """
        first: dict[int, int] = {}  # id(tensor) -> first / last block using it
        last: dict[int, int] = {}
        for block in range(self.num_blocks):
            for tensor in self._stage_tensors(block, block + 1):
                first.setdefault(id(tensor), block)
                last[id(tensor)] = block
        names = {id(t): f"parameter {n!r}" for n, t in self.root.named_parameters()}
        names |= {id(t): f"buffer {n!r}" for n, t in self.root.named_buffers()}
        forbidden: dict[int, str] = {}
        for key, a in first.items():
            b = last[key]
            where = f"blocks {a} and {b} ({self.block_names[a]!r}, {self.block_names[b]!r})"
            for cut in range(a + 1, b + 1):
                forbidden.setdefault(cut, f"{names.get(key, 'a tensor')} is used by {where}")
        return dict(sorted(forbidden.items()))

    def _check_range(self, first_block: int, stop_block: int) -> None:
        if not 0 <= first_block < stop_block <= self.num_blocks:
            raise PartitionError(
                f"blocks [{first_block}, {stop_block}) are not a stage of {self.name}: it has {self.num_blocks} "
                f"blocks, so a stage needs 0 <= first_block < stop_block <= {self.num_blocks}"
            )

    def _block_nodes(self, block: int) -> list[fx.Node]:
        return self._nodes[self._bounds[block] : self._bounds[block + 1]]

    def _stage_nodes(self, first_block: int, stop_block: int) -> list[fx.Node]:
        return self._nodes[self._bounds[first_block] : self._bounds[stop_block]]

    def _stage_tensors(self, first_block: int, stop_block: int) -> list[torch.Tensor]:
        tensors: list[torch.Tensor] = []
        for node in self._stage_nodes(first_block, stop_block):
            if node.op == "call_module":
                sub = self.root.get_submodule(str(node.target))
                tensors += [*sub.parameters(), *sub.buffers()]
            for attr in _get_attr_inputs(node):
                value = _fetch_attr(self.root, str(attr.target))
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif isinstance(value, nn.Module):
                    tensors += [*value.parameters(), *value.buffers()]
        return tensors


def _trace(module: nn.Module, name: str) -> fx.Graph:
    try:
        return fx.Tracer().trace(module)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ... depending on the construct
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        label = name if name == type(module).__name__ else f"{name} ({type(module).__name__})"
        raise PartitionError(
            f"cannot trace {label} with torch.fx: {reason}. lightning_cmp cuts the traced graph into stages, so "
            "explicit partition=[...] cuts need a traceable module too. Fix: pass module='<submodule>' to split a "
            f"traceable submodule{_children_hint(module)}, or make the control flow static (no Python if/for/while "
            "on tensor values in forward)"
        ) from exc


def _check_signature(graph: fx.Graph, module: nn.Module, name: str) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    needed = [n for n in placeholders if n.users or not n.args]  # args holds the default, if any
    if len(needed) != 1 or needed[0] is not placeholders[0]:
        found = ", ".join(str(n.target) for n in needed) or "nothing"
        raise PartitionError(
            f"{name}.forward needs {len(needed)} inputs ({found}); lightning_cmp splits modules that take one "
            f"tensor: pass module='<submodule>' to split a submodule that does{_children_hint(module)}, "
            "or give the other arguments defaults"
        )
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(result, fx.Node) or not _is_tensor(result):
        found = _kind(result) if not isinstance(result, fx.Node) else f"{_article(_describe(result))} (not a tensor)"
        built = isinstance(result, fx.Node) and _builds_object(result)  # a namedtuple of outputs
        fix = "build it to return one tensor (torchvision's googlenet, inception_v3: aux_logits=False) or "
        raise PartitionError(
            f"{name}.forward returns {found}; lightning_cmp splits modules that return one tensor: "
            f"{fix if built else ''}pass module='<submodule>' to split the submodule that does{_children_hint(module)}"
        )


def _kind(value: object) -> str:
    """``a dict`` for fx's immutable_dict (and list, tuple), ``None``, else the type with an article."""
    if value is None:
        return "None"
    kind = next((t.__name__ for t in (dict, list, tuple) if isinstance(value, t)), type(value).__name__)
    return _article(kind)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {noun}"


def _children_hint(module: nn.Module) -> str:
    """The children worth splitting: those holding parameters or layers (not metrics, losses or activations)."""
    names = [repr(n) for n, child in module.named_children() if _holds_layers(child) and not _is_metric(child)]
    return f" (its children holding layers: {', '.join(names)})" if names else ""


def _holds_layers(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.children())


def _is_metric(module: nn.Module) -> bool:
    # A torchmetrics Metric (duck-typed: the partition layer does not import torchmetrics).
    return hasattr(module, "compute") and hasattr(module, "update") and hasattr(module, "dist_sync_on_step")


def _find_cuts(graph: fx.Graph, nodes: list[fx.Node], module: nn.Module) -> tuple[list[int], list[fx.Node]]:
    """Block boundaries (indices into ``nodes``) and the single value carried across each boundary.

    A position is no cut if a later op modifies the carried value in place (``ReLU(inplace=True)`` after a
    residual add): the next stage would receive it as a leaf that requires grad, which autograd forbids.
    """
    position = {n: i for i, n in enumerate(nodes)}
    output = next(n for n in graph.nodes if n.op == "output")
    live = {next(n for n in graph.nodes if n.op == "placeholder")}
    bounds, carried = [0], [next(iter(live))]
    for i, node in enumerate(nodes[:-1]):
        live = {n for n in (*live, node) if _used_after(n, i, position)}
        value = next(iter(live))
        if len(live) == 1 and _is_tensor(value) and not _mutated_after(value, i, position, module):
            bounds.append(i + 1)
            carried.append(value)
    bounds.append(len(nodes))
    result = output.args[0]
    assert isinstance(result, fx.Node), "checked by _check_signature"
    carried.append(result)
    return bounds, carried


def _used_after(node: fx.Node, index: int, position: dict[fx.Node, int]) -> bool:
    """Whether a user of ``node`` comes after compute node ``index`` (the output node comes after all)."""
    return any(position.get(user, len(position)) > index for user in node.users)


def _mutated_after(node: fx.Node, index: int, position: dict[fx.Node, int], module: nn.Module) -> bool:
    return any(
        position[user] > index and user.args[0] is node and _is_inplace(user, module)
        for user in node.users
        if user in position and user.args
    )


def _is_inplace(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return getattr(module.get_submodule(str(node.target)), "inplace", False) is True
    name = str(getattr(node.target, "__name__", node.target))
    return node.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__"))


def _is_tensor(node: fx.Node) -> bool:
    """Static guess, from how a value was made, whether it is a tensor (fx proxies carry no types)."""
    if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
        return False
    if _builds_object(node) or _returns_tuple(node):
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _NON_TENSOR_ATTRS
    if node.op == "call_function" and node.target is len:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.all_input_nodes[0]
        return _returns_tuple(source) or _is_tensor(source)
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return any(_is_tensor(a) for a in node.all_input_nodes if a.op != "get_attr")
    return True


def _returns_tuple(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) in _TUPLE_OPS


def _builds_object(node: fx.Node) -> bool:
    """A class called in forward, e.g. a namedtuple of outputs (torchvision's ``GoogLeNetOutputs``)."""
    target = node.target
    return node.op == "call_function" and isinstance(target, type) and not issubclass(target, torch.Tensor)


def _get_attr_inputs(node: fx.Node) -> Iterable[fx.Node]:
    return (a for a in node.all_input_nodes if a.op == "get_attr")


def _fetch_attr(module: nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _describe(node: fx.Node) -> str:
    if _builds_object(node):
        return str(getattr(node.target, "__name__", node.target))
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _block_names(blocks: list[list[fx.Node]]) -> list[str]:
    """Name a block by the outermost modules it holds whole (``layer1.0``), else by its first node (``flatten``)."""
    owners: dict[str, set[int]] = {}  # module path (and every parent path) -> blocks calling into it
    for block, nodes in enumerate(blocks):
        for node in nodes:
            for prefix in _prefixes(node) if node.op == "call_module" else []:
                owners.setdefault(prefix, set()).add(block)
    names: list[str] = []
    seen: dict[str, int] = {}
    for block, nodes in enumerate(blocks):
        # A module called from several blocks (reused) is held whole by none: fall back to its own path.
        modules = [n for n in nodes if n.op == "call_module"]
        whole = [next((p for p in _prefixes(n) if owners[p] == {block}), str(n.target)) for n in modules]
        name = nodes[0].name if not whole else whole[0]
        if whole and not (whole[-1] + ".").startswith(whole[0] + "."):
            name = f"{whole[0]}..{whole[-1]}"
        seen[name] = seen.get(name, -1) + 1
        names.append(f"{name}#{seen[name]}" if seen[name] else name)
    return names


def _prefixes(node: fx.Node) -> list[str]:
    """``layer1.0.conv1`` -> ``["layer1", "layer1.0", "layer1.0.conv1"]``: outermost first."""
    parts = str(node.target).split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
