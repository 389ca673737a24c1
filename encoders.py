"""
encoders.py: other encoders behind the probes' contract, for eval.py's --ckpt / --compare timm:NAME_OR_DIR and
hf:NAME_OR_DIR (Rad-DINO, DINOv2, any timm model). One adapter (ExternalEncoder) gives each the contract of
radjepa.load_encoder: gray x [B, 1, H, W] in [0, 1] -> patch tokens [B, N, D] (optionally the last k blocks),
so every probe of eval.py runs unchanged on them. timm and transformers stay optional: a missing one is a
one-line error naming what to install.
"""
import contextlib
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__:  # installed: this file is radjepa.encoders, its sibling radjepa.plumbing
    from . import plumbing
else:            # a clone: imported by eval.py from the repository root
    import plumbing

BadInput = plumbing.BadInput  # eval.py prints each as one line, as it does its own errors
EXTERNAL = ("timm:", "hf:")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_external(spec):
    return spec.startswith(EXTERNAL)


class ExternalEncoder(nn.Module):
    """A frozen timm / Hugging Face image model with load_encoder's contract: x float [B, 1, H, W] in [0, 1]
    -> patch tokens [B, N, D], row-major on the model's own square g x g grid. Per batch: resize to the
    model's input size (antialiased bilinear, the whole image: no centre crop, which would cut off the
    costophrenic angles), gray -> its number of channels (the same values in each), (x - mean) / std with its
    own statistics, run it, and drop the tokens that are not patches (CLS, registers, distillation token).
    Rad-DINO: 518 px, patch 14 -> 37 x 37 tokens. With n_last_blocks=k: a list of the last k blocks' tokens
    through the final norm (as for --pool last4)."""

    def __init__(self, spec, model, size, chans, mean, std, patch=None, nhwc=False):
        super().__init__()
        self.spec, self.model, self.size, self.chans = spec, model.float().eval(), size, chans
        self.nhwc = nhwc
        for n, v in (("mean", mean), ("std", std)):          # one value for gray models, else one per channel
            v = [float(a) for a in v] * (chans if len(v) == 1 else 1)
            self.register_buffer(n, torch.tensor(v).view(1, -1, 1, 1))
        if self.mean.shape[1] != chans:
            raise BadInput(f"{spec}: mean/std have {self.mean.shape[1]} values, the model takes {chans} "
                            "channels")
        self.requires_grad_(False)
        with torch.no_grad():                               # one blank image tells where the patch tokens are
            out = self.run(torch.zeros(1, chans, size[0], size[1]))
        grid, self.n_prefix = None, 0
        if out.ndim == 4:                                       # a feature map: NCHW (CNNs), NHWC (timm Swin)
            grid = tuple(out.shape[1:3] if nhwc else out.shape[2:])
        elif out.ndim == 3:
            L, g = out.shape[1], (size[0] // patch, size[1] // patch) if patch else (0, 0)
            if g[0] and 0 <= L - g[0] * g[1] <= 8:             # ViT-like: [CLS, registers, ..., patch tokens]
                grid, self.n_prefix = g, L - g[0] * g[1]
            elif math.isqrt(L) ** 2 == L:                  # no patch size known (or hierarchical): all tokens
                grid = (math.isqrt(L),) * 2
        if not grid or grid[0] != grid[1] or grid[0] == 0:
            raise BadInput(f"{spec}: its output {tuple(out.shape)} at {size[0]}x{size[1]} px has no square "
                            "patch grid (eval.py needs per-patch tokens [B, g*g (+ up to 8 CLS/register "
                            "tokens), D])")
        self.grid, self.dim = int(grid[0]), int(out.shape[1 if out.ndim == 4 and not nhwc else -1])
        self.patch_size = size[0] // self.grid            # pixels per token side (the pixel baseline uses it)
        self.config = {"img_size": size[0], "source": spec, "model": type(model).__name__, "grid": self.grid,
                       "dim": self.dim, "prefix_tokens_dropped": self.n_prefix, "channels": chans,
                       "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def describe(self):
        c = self.config
        return (f"{self.spec} ({c['model']}, {c['img_size']} px, {c['grid']}x{c['grid']} tokens of "
                f"{c['dim']} dims, {c['prefix_tokens_dropped']} CLS/register token(s) dropped, gray -> "
                f"{c['channels']} channel(s), mean {[round(v, 4) for v in c['mean']]}, std "
                f"{[round(v, 4) for v in c['std']]})")

    def run(self, x, k=None):
        """The model's own output: [B, L, D] tokens or a [B, C, h, w] map (a list of the last k with k)."""
        if hasattr(self.model, "forward_features"):            # timm
            if k:                                              # min(k, taps), as load_encoder's min(k, depth)
                taps = getattr(self.model, "feature_info", None) or getattr(self.model, "blocks", ())
                k = min(k, len(taps) or k)
                return self.model.forward_intermediates(x, indices=k, norm=True, output_fmt="NCHW",
                                                        intermediates_only=True)
            return self.model.forward_features(x)
        out = self.model(pixel_values=x, output_hidden_states=bool(k))
        if not k:
            return out.last_hidden_state
        norm = getattr(self.model, "layernorm", None)   # ViT / DINOv2: the final norm sits outside the blocks
        hidden = out.hidden_states[1:]                          # [0] is the embedding output, not a block's
        return [norm(h) if norm is not None and h.ndim == 3 else h for h in hidden[-k:]]

    def tokens(self, out, fmt_nhwc):
        if out.ndim == 4:
            return (out.flatten(1, 2) if fmt_nhwc else out.flatten(2).transpose(1, 2))   # [B, h*w, C]
        return out[:, self.n_prefix:]

    def forward(self, x, n_last_blocks=None):
        x = F.interpolate(x.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        x = (x.expand(-1, self.chans, -1, -1) - self.mean) / self.std
        if n_last_blocks:
            return [self.tokens(o, False) for o in self.run(x, n_last_blocks)]
        return self.tokens(self.run(x), self.nhwc)


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _load_timm(spec, name, random_init):
    try:
        import timm
        import timm.data
    # not installed, or a torchvision built for another torch ("torchvision::nms ... not exist")
    except Exception as e:
        raise BadInput(f"{spec} needs timm: pip install timm (and a torchvision built for torch "
                        f"{torch.__version__}); import failed with {_first_line(e)}")
    if os.path.isdir(name):                               # e.g. `radjepa.py export` output, or a hub snapshot
        cfg = plumbing.read_json(os.path.join(name, "config.json"))
        if not isinstance(cfg, dict) or "architecture" not in cfg:
            raise BadInput(f"{name}: not a timm model folder (no config.json with an 'architecture')")
        try:
            model = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
        except Exception as e:
            raise BadInput(f"{name}/config.json does not build a timm model ({_first_line(e)})")
        if not random_init:
            files = [os.path.join(name, f) for f in ("model.safetensors", "pytorch_model.bin")]
            w = next((f for f in files if os.path.isfile(f)), None)
            if w is None:
                raise BadInput(f"{name}: no weights (model.safetensors or pytorch_model.bin)")
            try:
                if w.endswith(".safetensors"):
                    import safetensors.torch
                    sd = safetensors.torch.load_file(w)
                else:
                    sd = torch.load(w, map_location="cpu", weights_only=True)
                model.load_state_dict(sd)
            except Exception as e:
                raise BadInput(f"{w}: cannot load into {cfg['architecture']} ({_first_line(e)})")
        pc = {**dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD),
              **cfg.get("pretrained_cfg", {})}
    else:
        try:
            model = timm.create_model(name, pretrained=not random_init, num_classes=0)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise BadInput(f"{spec}: unknown timm model name (see "
                                f"timm.list_models('*{name.split('.')[0][:8]}*'))")
            raise BadInput(f"{spec}: {_first_line(e)}")
        except Exception as e:                             # no network and no cached weights, bad hub id, ...
            raise BadInput(f"{spec}: cannot get the pretrained weights ({_first_line(e)}); for a local copy "
                            "pass timm:FOLDER (config.json + weights)")
        pc = timm.data.resolve_model_data_config(model)
    chans = int(pc["input_size"][0])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return model, tuple(pc["input_size"][1:]), chans, pc["mean"], pc["std"], patch, \
        getattr(model, "output_fmt", "NCHW") == "NHWC"


def _hf_file(name, filename):
    if os.path.isdir(name):
        return plumbing.read_json(os.path.join(name, filename))
    try:
        from huggingface_hub import hf_hub_download
        return plumbing.read_json(hf_hub_download(name, filename))
    except Exception:
        return None


@contextlib.contextmanager
def _no_hub_kernels():
    """Keep transformers away from Hugging Face's `kernels` package while it imports and loads a model.
    transformers >= 5 depends on that package and, when it is installed, imports names from the top-level
    module `kernels`, which from the repository root is this project's `kernels/` (ImportError: cannot import
    name 'CUDAProperties'), and from_pretrained kernelizes by default. Here sys.modules['kernels'] = None,
    which find_spec reads as "not installed", and USE_HUB_KERNELS=NO: transformers keeps its plain PyTorch
    layers (hub kernels only swap in fused GPU layers; a frozen encoder gives the same tokens). Our package
    and the environment are put back afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    env = os.environ.get("USE_HUB_KERNELS")
    for k in saved:
        del sys.modules[k]
    sys.modules["kernels"] = None
    os.environ["USE_HUB_KERNELS"] = "NO"
    try:
        yield
    finally:
        del sys.modules["kernels"]
        sys.modules.update(saved)
        if env is None:
            del os.environ["USE_HUB_KERNELS"]
        else:
            os.environ["USE_HUB_KERNELS"] = env


def import_transformers():
    """`import transformers` with its model code loaded (transformers.modeling_utils), safe from the
    repository root (_no_hub_kernels). Raises what the import raises."""
    with _no_hub_kernels():
        import transformers
        import transformers.modeling_utils  # noqa: F401  (its hub-kernel integration loads now, in the guard)
        return transformers


def _load_hf(spec, name, random_init):
    try:
        transformers = import_transformers()
    except Exception as e:
        raise BadInput(f"{spec} needs transformers: pip install transformers (import failed with "
                        f"{_first_line(e)})")
    with _no_hub_kernels():
        return _load_hf_model(transformers, spec, name, random_init)


def _load_hf_model(transformers, spec, name, random_init):
    import inspect
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise BadInput(f"{name}: not a Hugging Face model folder (no config.json)")
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise BadInput(f"{name}: no such folder (hf: takes a local folder or a hub name like "
                        "microsoft/rad-dino)")
    transformers.utils.logging.disable_progress_bar()          # its per-tensor loading bar; warnings stay on
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        model = (transformers.AutoModel.from_config(config) if random_init
                 else transformers.AutoModel.from_pretrained(name))
    except Exception as e:                             # unknown name, offline, not a model, unknown type, ...
        raise BadInput(f"{spec}: cannot load a model ({_first_line(e)})")
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise BadInput(f"{spec}: {type(model).__name__} is not an image encoder (it takes no pixel_values)")
    pp = _hf_file(name, "preprocessor_config.json") or {}
    size = getattr(config, "image_size", 224)
    for key in ("crop_size", "size"):                       # the model's input size, as its processor sets it
        v = pp.get(key) if key == "size" or pp.get("do_center_crop", True) else None
        if isinstance(v, int) or (isinstance(v, dict) and ("height" in v or "shortest_edge" in v)):
            size = v if isinstance(v, int) else (v["height"], v["width"]) if "height" in v \
                else v["shortest_edge"]
            break
    size = (size, size) if isinstance(size, int) else tuple(size)
    norm = pp.get("do_normalize", True)
    mean, std = (pp.get("image_mean", IMAGENET_MEAN), pp.get("image_std", IMAGENET_STD)) if norm \
        else ([0.0], [1.0])
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return model, size, int(getattr(config, "num_channels", 3)), mean, std, patch, False


def load_external(spec, device="cpu", random_init=False, seed=0):
    """timm:NAME (pretrained weights, downloaded once by timm), timm:FOLDER (config.json + weights, e.g.
    written by `radjepa.py export`), hf:NAME (Hugging Face hub, e.g. hf:microsoft/rad-dino) or hf:FOLDER (a
    saved model, works offline) -> ExternalEncoder. random_init=True: the same architecture with fresh weights
    (nothing downloaded for timm; hf reads only config.json)."""
    kind, name = spec.split(":", 1)
    name = os.path.expanduser(name)
    if not name:
        raise BadInput(f"{spec}: give a model name or folder after '{kind}:'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, size, chans, mean, std, patch, nhwc = (_load_timm if kind == "timm" else _load_hf)(spec, name,
                                                                                                  random_init)
    try:
        return ExternalEncoder(spec, model, size, chans, mean, std, patch, nhwc).to(device)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{spec}: a {size[0]}x{size[1]} px, {chans}-channel image does not run "
                        f"({_first_line(e)})")
