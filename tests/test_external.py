"""RadJEPA weights in timm, and external encoders (timm:, hf:) in eval.py. Offline: nothing is downloaded.

timm imports torchvision, and the only torchvision wheels for the CPU torch of requirements.txt are CUDA builds that do
not load with it, so the timm tests skip where timm cannot be imported. .ci/run runs this file a second time in a venv
with torch 2.14.1 + torchvision 0.29.1 + timm and sets RADJEPA_REQUIRE=timm there: then a missing timm fails instead
of skipping (the same for transformers in the main venv)."""
import importlib
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"          # before huggingface_hub is imported: a test can never download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import encoders as X  # noqa: E402
import eval as E  # noqa: E402
import plumbing  # noqa: E402
import radjepa  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = set(filter(None, os.environ.get("RADJEPA_REQUIRE", "").split(",")))


def _import_error(module):
    try:
        X.import_transformers() if module == "transformers" else importlib.import_module(module)
        return None
    except Exception as e:  # ImportError, or timm's torchvision failing to load ("torchvision::nms does not exist")
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


TIMM_ERR, HF_ERR = _import_error("timm"), _import_error("transformers")
needs_timm = pytest.mark.skipif(TIMM_ERR is not None and "timm" not in REQUIRED,
                                reason=f"timm cannot be imported here ({TIMM_ERR}); .ci/run runs these in .venv-timm")
needs_hf = pytest.mark.skipif(HF_ERR is not None and "transformers" not in REQUIRED,
                              reason=f"transformers cannot be imported here ({HF_ERR})")


def test_required_optional_packages_import():
    """Where CI asks for them (RADJEPA_REQUIRE=timm,transformers) the optional packages must import: no silent skip."""
    errors = {m: e for m, e in (("timm", TIMM_ERR), ("transformers", HF_ERR)) if m in REQUIRED and e}
    assert not errors, errors


@needs_hf
def test_transformers_loads_beside_our_kernels_package():
    """transformers >= 5 imports Hugging Face's `kernels`, a name that from the repository root is ours: X.import_
    transformers hides ours during the import, and afterwards `kernels` is this project's package again."""
    import kernels
    before = kernels
    T = X.import_transformers()
    assert hasattr(T, "AutoModel") and os.environ.get("USE_HUB_KERNELS") != "NO"
    import kernels as after
    assert after is before and os.path.dirname(after.__file__) == os.path.join(REPO, "kernels")
    from kernels import varlen_attention  # noqa: F401  (its submodules import as before)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


# ------------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny RadJEPA checkpoint (64 px, patch 16 -> 4x4 grid, 2 blocks, width 64) whose every parameter, biases and
    LayerNorms included, is perturbed away from its init, so a wrongly mapped tensor cannot go unnoticed; and a tiny
    prepared data set."""
    root = tmp_path_factory.mktemp("external")
    c = radjepa.make_config({"model": "vit_tiny", "depth": 2, "width": 64, "heads": 2, "pred_width": 32,
                             "patch": 16, "img_size": 64})
    torch.manual_seed(0)
    enc = radjepa.build_encoder(c)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from dataclasses import asdict
    ckpt = root / "ckpt.pt"
    torch.save(dict(format="radjepa-v1", config=asdict(c), target_encoder=enc.state_dict(), step=7), ckpt)
    data = root / "prep"
    subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "synthetic", str(data), "--n", "48",
                    "--size", "64", "--seed", "0"], check=True, capture_output=True, timeout=180)
    return ckpt, data, root


@pytest.fixture(scope="module")
def exported(tiny):
    ckpt, _, root = tiny
    radjepa.export_main([str(ckpt), str(root / "timm")])
    return root / "timm"


def _hf_dinov2(folder, registers=0, crop=(56, 56), seed=0):
    """A tiny randomly initialised DINOv2 (56 px, patch 14 -> 4x4 grid, width 32) saved like a hub model, with a
    Rad-DINO-style preprocessor_config.json (one-channel statistics repeated over RGB)."""
    import transformers as T
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=56,
              patch_size=14)
    model = (T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
             if registers else T.Dinov2Model(T.Dinov2Config(**kw)))
    model.save_pretrained(folder)
    pp = dict(do_center_crop=True, crop_size=dict(height=crop[0], width=crop[1]), size=dict(shortest_edge=crop[0]),
              do_normalize=True, image_mean=[0.5307] * 3, image_std=[0.2583] * 3, do_rescale=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(pp))
    return model.eval()


def _timm_folder(folder, **model_args):
    """A timm model created with pretrained=False (nothing downloaded), saved as config.json + weights."""
    import timm
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, reg_tokens=2)
    args.update(model_args)
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    size = args["img_size"] if isinstance(args["img_size"], list) else [args["img_size"]] * 2
    pc = dict(input_size=[3, *size], mean=[0.5] * 3, std=[0.25] * 3)
    (folder / "config.json").write_text(json.dumps(dict(architecture="vit_tiny_patch16_224", model_args=args,
                                                        pretrained_cfg=pc)))
    return model.eval()


def _one_line_error(capsys, argv, words):
    capsys.readouterr()
    assert E.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    return err


# ------------------------------------------------------------------------------------------------------ export to timm

def test_export_writes_a_plain_state_dict_and_a_self_contained_config(tiny, exported):
    ckpt, _, _ = tiny
    sd = torch.load(exported / "pytorch_model.bin", weights_only=True)
    cfg = json.loads((exported / "config.json").read_text())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert "patch_embed.proj.weight" in sd and "blocks.1.mlp.fc2.bias" in sd and "norm.weight" in sd
    assert not any(k.startswith(("cls_token", "reg_token", "head", "fc_norm")) or ".mlp.0." in k for k in sd)
    assert sd["patch_embed.proj.weight"].shape == (64, 1, 16, 16)
    torch.testing.assert_close(sd["pos_embed"][0], radjepa.sincos_pos_embed(4, 4, 64), rtol=0, atol=0)
    a = cfg["model_args"]
    assert (a["in_chans"], a["class_token"], a["global_pool"], a["num_classes"], a["img_size"], a["patch_size"],
            a["embed_dim"], a["depth"], a["num_heads"]) == (1, False, "avg", 0, 64, 16, 64, 2, 2)
    pc = cfg["pretrained_cfg"]
    assert pc["mean"] == [radjepa.MEAN] and pc["std"] == [radjepa.STD] and pc["input_size"] == [1, 64, 64]
    assert cfg["radjepa"]["step"] == 7


@needs_timm
def test_export_loads_strictly_in_timm_and_gives_load_encoder_tokens(tiny, exported):
    import timm
    ckpt, _, _ = tiny
    cfg = json.loads((exported / "config.json").read_text())           # config.json alone builds the model
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    model.load_state_dict(torch.load(exported / "pytorch_model.bin", weights_only=True), strict=True)
    ours = radjepa.load_encoder(str(ckpt))
    mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, -1, 1, 1)
    torch.manual_seed(0)
    for _ in range(3):                                                   # several random batches in [0, 1]
        x = torch.rand(5, 1, 64, 64)
        with torch.no_grad():
            ref, tok = ours(x), model.forward_features((x - mean) / std)
            pooled = model.forward_head(tok, pre_logits=True)
        torch.testing.assert_close(tok, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, ref.mean(1), rtol=0, atol=1e-5)   # avg pool, no fc_norm: the probes' mean
    if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # timm >= 1.0.2x: one call does it all
        m2 = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(m2.forward_features((x - mean) / std), ref, rtol=0, atol=1e-5)


@needs_timm
def test_export_at_another_resolution_exact_table_vs_timm_interpolation(tiny, exported):
    """At 128 px (8x8 tokens) load_encoder computes the sin-cos table exactly at positions scaled to the 4x4 training
    grid; timm's own resizing interpolates the stored 4x4 table (bicubic), which is close but not equal. Replacing
    pos_embed with radjepa.sincos_pos_embed(8, 8, D, ref=(4, 4)) matches exactly."""
    import timm
    ckpt, _, _ = tiny
    cfg = json.loads((exported / "config.json").read_text())
    sd = torch.load(exported / "pytorch_model.bin", weights_only=True)
    x = torch.rand(4, 1, 128, 128)
    xn = (x - radjepa.MEAN) / radjepa.STD
    with torch.no_grad():
        ref = radjepa.load_encoder(str(ckpt))(x)
        exact = timm.create_model(cfg["architecture"], pretrained=False, **{**cfg["model_args"], "img_size": 128})
        exact.load_state_dict({**sd, "pos_embed": radjepa.sincos_pos_embed(8, 8, 64, ref=(4, 4))[None]})
        torch.testing.assert_close(exact.eval().forward_features(xn), ref, rtol=0, atol=1e-5)
        interp = timm.create_model(cfg["architecture"], pretrained=False,
                                   **{**cfg["model_args"], "dynamic_img_size": True}).eval()
        interp.load_state_dict(sd)
        d = (interp.forward_features(xn) - ref).abs().max().item()
    assert d > 1e-3, d                                                   # interpolation is an approximation


def test_export_cli_and_its_errors(tiny, tmp_path):
    ckpt, _, _ = tiny
    r = subprocess.run([sys.executable, os.path.join(REPO, "radjepa.py"), "export", str(ckpt), str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "config.json").is_file() and (tmp_path / "t" / "pytorch_model.bin").is_file()
    assert not [f for f in os.listdir(tmp_path / "t") if "tmp" in f]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    nan = tmp_path / "nan.pt"                      # issue 22: export wrote a timm model from NaN weights, exit 0
    ck = torch.load(ckpt, weights_only=True)
    next(iter(ck["target_encoder"].values())).fill_(float("nan"))
    torch.save(ck, nan)
    for arg, why in ((bad, "not a RadJEPA checkpoint"), (tmp_path / "missing.pt", "no such checkpoint"),
                     (nan, "NaN/Inf")):                                    # in-process: the same export_main
        with pytest.raises(SystemExit) as e:
            radjepa.export_main([str(arg), str(tmp_path / "u")])
        err = str(e.value)
        assert err.startswith(f"error: {arg}") and why in err and "\n" not in err, err
    assert not (tmp_path / "u").exists()                                   # nothing written on error


# ------------------------------------------------------------------------------------------- the external adapter

@needs_hf
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_adapter_drops_cls_and_registers_and_keeps_the_grid(tmp_path, registers):
    model = _hf_dinov2(tmp_path / "m", registers=registers)
    enc = X.load_external(f"hf:{tmp_path / 'm'}")
    assert (enc.size, enc.grid, enc.n_prefix, enc.dim, enc.chans) == ((56, 56), 4, 1 + registers, 32, 3)
    x = torch.rand(3, 1, 64, 64)                                          # any input size: resized to the model's
    with torch.no_grad():
        tok = enc(x)
        xm = torch.nn.functional.interpolate(x, size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
        want = model(pixel_values=((xm - 0.5307) / 0.2583).expand(-1, 3, -1, -1)).last_hidden_state
    assert tok.shape == (3, 16, 32)
    torch.testing.assert_close(tok, want[:, 1 + registers:], rtol=0, atol=1e-6)   # the patch tokens, in grid order
    last = enc(x, n_last_blocks=4)                                        # min(4, depth) blocks, as load_encoder
    assert len(last) == 3 and all(t.shape == (3, 16, 32) for t in last)
    torch.testing.assert_close(last[-1], tok, rtol=0, atol=1e-6)          # the last one is the final output
    # random_init: same architecture, other weights, nothing read but config.json
    rnd = X.load_external(f"hf:{tmp_path / 'm'}", random_init=True, seed=3)
    assert rnd.grid == 4 and not torch.allclose(rnd(x), tok)


@needs_timm
def test_timm_adapter_on_a_name_and_a_folder(tmp_path):
    """timm:NAME with random_init (= pretrained=False, no download) and timm:FOLDER: [B, N, D] on the right grid."""
    enc = X.load_external("timm:vit_tiny_patch16_224", random_init=True)
    assert (enc.size, enc.grid, enc.n_prefix, enc.dim, enc.chans) == ((224, 224), 14, 1, 192, 3)
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 196, 192)
    model = _timm_folder(tmp_path / "t")                                  # class token + 2 registers, 4x4 grid
    enc = X.load_external(f"timm:{tmp_path / 't'}")
    assert (enc.size, enc.grid, enc.n_prefix, enc.dim) == ((32, 32), 4, 3, 32)
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        xm = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        want = model.forward_features(((xm - 0.5) / 0.25).expand(-1, 3, -1, -1))[:, 3:]
        torch.testing.assert_close(enc(x), want, rtol=0, atol=1e-6)
        last = enc(x, n_last_blocks=4)                                    # min(4, depth)
    assert len(last) == 2 and all(t.shape == (3, 16, 32) for t in last)
    torch.testing.assert_close(last[-1], want, rtol=0, atol=1e-5)


@needs_timm
def test_timm_feature_maps_become_tokens_in_grid_order(tmp_path):
    """CNNs (NCHW maps) and Swin (NHWC maps) also give [B, h*w, C] row-major tokens; last-k works on their stages."""
    import timm
    enc = X.load_external("timm:resnet10t", random_init=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        xm = torch.nn.functional.interpolate(x, size=enc.size, mode="bilinear", antialias=True, align_corners=False)
        fmap = enc.model.forward_features(((xm - enc.mean) / enc.std))            # [B, C, h, w]
        torch.testing.assert_close(enc(x), fmap.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
    assert (enc.n_prefix, enc.grid, enc.dim) == (0, fmap.shape[-1], fmap.shape[1])
    args = dict(num_classes=0, embed_dim=16, depths=[1, 1], num_heads=[1, 2], img_size=64, window_size=4)
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()
    (tmp_path / "swin").mkdir()
    torch.save(swin.state_dict(), tmp_path / "swin" / "pytorch_model.bin")
    (tmp_path / "swin" / "config.json").write_text(json.dumps(dict(
        architecture="swin_tiny_patch4_window7_224", model_args=args, pretrained_cfg=dict(input_size=[3, 64, 64]))))
    enc = X.load_external(f"timm:{tmp_path / 'swin'}")
    with torch.no_grad():
        want = swin.forward_features((x.expand(-1, 3, -1, -1) - enc.mean) / enc.std)  # [B, 8, 8, 32] NHWC
        tok, last = enc(x), enc(x, n_last_blocks=4)
    assert (enc.nhwc, enc.grid, tok.shape) == (True, 8, (2, 64, 32))
    torch.testing.assert_close(tok, want.flatten(1, 2), rtol=0, atol=1e-6)
    assert len(last) == 2                                                  # min(4, number of stages)
    torch.testing.assert_close(last[-1], tok, rtol=0, atol=1e-5)


def test_an_output_without_a_patch_grid_is_one_clear_error():
    class Pooled(nn.Module):                                  # a timm-like model whose features are already pooled
        def forward_features(self, x):
            return x.mean((2, 3))
    with pytest.raises(plumbing.BadInput, match="no square patch grid"):
        X.ExternalEncoder("timm:pooled", Pooled(), (32, 32), 3, X.IMAGENET_MEAN, X.IMAGENET_STD, patch=8)

    class Tokens(nn.Module):                                  # 10 tokens: neither a 4x4 grid + prefix nor a square
        def forward_features(self, x):
            return torch.zeros(len(x), 10, 8)
    with pytest.raises(plumbing.BadInput, match="no square patch grid"):
        X.ExternalEncoder("timm:odd", Tokens(), (32, 32), 3, X.IMAGENET_MEAN, X.IMAGENET_STD, patch=8)


def test_cache_key_of_a_local_folder_follows_its_content(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"a")
    k1 = E.source_fingerprint(f"hf:{tmp_path / 'm'}")
    (tmp_path / "m" / "w.bin").write_bytes(b"b")
    k2 = E.source_fingerprint(f"hf:{tmp_path / 'm'}")
    assert k1 != k2 and k1["source"] == k2["source"]
    assert E.source_fingerprint("hf:microsoft/rad-dino") == {"source": "hf:microsoft/rad-dino"}


# ------------------------------------------------------------------------------------------ eval.py end to end

def _eval(tiny, out, compare, *extra):
    ckpt, data, _ = tiny
    return E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--compare", compare, "--epochs", "2",
                   "--seg-epochs", "2", "--n-boot", "30", "--mask-size", "32", "--seg-img-size", "64",
                   "--report-epochs", "1", "--report-width", "32", "--report-layers", "1", *extra])  # a tiny decoder


def _check_other_everywhere(out, source_words):
    m = json.loads((out / "metrics.json").read_text())
    assert m["compare"] == "other" and source_words in m["encoders"]["other"]
    assert {f"other/{p}" for p in ("linear", "grid", "attentive")} <= set(m["classification"])
    assert "other" in m["classification"]["jepa/grid"]["vs"] and "other" in m["segmentation"]["jepa"]["vs"]
    for st, e in m["segmentation"]["other"]["dice"].items():
        assert 0 <= e["dice"] <= 1
    report = (out / "report.md").read_text()
    assert source_words in report and "| other |" in report and "p vs other" in report
    return m


@needs_hf
def test_eval_with_an_hf_encoder_as_compare_runs_every_probe(tiny, tmp_path, capsys):
    _hf_dinov2(tmp_path / "dino", registers=4)
    spec = f"hf:{tmp_path / 'dino'}"
    assert _eval(tiny, tmp_path / "ev", spec) == 0
    m = _check_other_everywhere(tmp_path / "ev", spec)
    assert m["features"]["other"]["dim"] == 32
    assert "4x4 tokens" in m["encoders"]["other"] and "5 CLS/register" in m["encoders"]["other"]
    capsys.readouterr()                                   # a rerun reuses the features, keyed by the folder's content
    assert _eval(tiny, tmp_path / "ev", spec, "--task", "cls", "--probe", "linear") == 0
    assert capsys.readouterr().out.count("features: cached") >= 3


@needs_timm
def test_eval_with_a_timm_encoder_as_compare_runs_every_probe(tiny, tmp_path):
    _timm_folder(tmp_path / "vit")
    assert _eval(tiny, tmp_path / "ev", f"timm:{tmp_path / 'vit'}") == 0
    _check_other_everywhere(tmp_path / "ev", f"timm:{tmp_path / 'vit'}")


@needs_timm
def test_eval_of_the_timm_export_equals_eval_of_the_checkpoint(tiny, exported, tmp_path):
    """--ckpt ckpt.pt --compare timm:EXPORT: the two encoders give the same tokens, so the same probe results."""
    assert _eval(tiny, tmp_path / "ev", f"timm:{exported}", "--task", "cls", "--probe", "linear", "grid",
                 "--no-baselines") == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    feats = {f.split("_")[1]: torch.load(tmp_path / "ev" / "cache" / f) for f in os.listdir(tmp_path / "ev" / "cache")}
    torch.testing.assert_close(feats["other"]["pooled"], feats["jepa"]["pooled"], rtol=0, atol=1e-5)
    for p in ("linear", "grid"):
        a, b = m["classification"][f"jepa/{p}"]["macro"], m["classification"][f"other/{p}"]["macro"]
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-3)


@needs_hf
def test_an_external_main_encoder_gets_a_random_twin(tiny, tmp_path):
    _hf_dinov2(tmp_path / "dino")
    ckpt, data, _ = tiny
    assert E.main(["--ckpt", f"hf:{tmp_path / 'dino'}", "--data", str(data), "--out", str(tmp_path / "ev"),
                   "--task", "cls", "--probe", "linear", "--n-boot", "20", "--compare", str(ckpt)]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["encoders"]) == {"jepa", "random", "other", "pixels"}
    assert m["encoders"]["jepa"].startswith(f"hf:{tmp_path / 'dino'}") and "RadJEPA" in m["encoders"]["other"]
    assert "randomly initialised" in m["encoders"]["random"]


# ------------------------------------------------------------------------------------------------- bad input

@needs_hf
def test_hf_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    ckpt, data, _ = tiny
    argv = lambda spec: ["--ckpt", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--compare", spec]
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, argv(f"hf:{tmp_path / 'empty'}"), "not a Hugging Face model folder")
    _one_line_error(capsys, argv(f"hf:{tmp_path / 'nowhere' / 'x'}"), "no such folder")
    _one_line_error(capsys, argv("hf:no-such-org/no-such-model-radjepa"), "cannot load a model")
    _one_line_error(capsys, argv("hf:"), "give a model name or folder")
    import transformers as T                              # a text model: no images in, so no patch grid out
    T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(tmp_path / "bert")
    _one_line_error(capsys, argv(f"hf:{tmp_path / 'bert'}"), "not an image encoder")
    _hf_dinov2(tmp_path / "wide", crop=(56, 42))          # a 4x3 token grid: the probes need a square one
    _one_line_error(capsys, argv(f"hf:{tmp_path / 'wide'}"), "no square patch grid")


@needs_timm
def test_timm_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    ckpt, data, _ = tiny
    argv = lambda spec: ["--ckpt", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--compare", spec]
    _one_line_error(capsys, argv("timm:no_such_model_radjepa"), "unknown timm model name")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, argv(f"timm:{tmp_path / 'empty'}"), "not a timm model folder")
    _timm_folder(tmp_path / "wide", img_size=[32, 24])   # a 4x3 token grid
    _one_line_error(capsys, argv(f"timm:{tmp_path / 'wide'}"), "no square patch grid")
    _timm_folder(tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "pytorch_model.bin")
    _one_line_error(capsys, argv(f"timm:{tmp_path / 'noweights'}"), "no weights")


@pytest.mark.parametrize("module,spec,words", [("timm", "timm:vit_tiny_patch16_224", "pip install timm"),
                                               ("transformers", "hf:microsoft/rad-dino", "pip install transformers")])
def test_a_missing_optional_package_is_one_line_naming_it(tiny, tmp_path, capsys, monkeypatch, module, spec, words):
    monkeypatch.setitem(sys.modules, module, None)        # `import module` now raises ImportError, as if not installed
    ckpt, data, _ = tiny
    _one_line_error(capsys, ["--ckpt", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--compare",
                             spec], words)
