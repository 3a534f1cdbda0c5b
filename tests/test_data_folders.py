"""Folder data sets in their usual layouts (tta.data.folders / coop), each layout once on tiny generated images:
labels, class names, 200-class masks, the V2 folder order, list files, CoOp split files, clear errors for
missing folders and files, the opt-in "sh" filter; then the runner on ImageNet-R (classifier, 200 outputs)
and a CoOp set with a tiny CLIP whose class list the config names."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tta import config
from tta.data import classes
from tta.data.folders import available, load_manifest
from tta.errors import ConfigError, MissingFileError
from test_data_fakes import coop_split, imagenet_val, save, subset_wnids, wnid_tree

ROOT = Path(__file__).resolve().parents[1]


def test_imagenet_validation_and_variants(tmp_path):
    imagenet_val(tmp_path, classes=2, per_class=2, side=64)
    m = load_manifest("imagenet_val", tmp_path)
    assert m.labels.tolist() == [0, 0, 1, 1] and m.logit_indices is None and len(m.classnames) == 1000

    a = subset_wnids("imagenet_a", 6)
    wnid_tree(tmp_path / "imagenet-adversarial" / "imagenet-a", [a[0], a[5]], names=["x_fish.jpg", "y.jpg"])
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("not a class")
    m = load_manifest("imagenet_a", tmp_path)
    assert m.labels.tolist() == [0, 0, 5, 5] and m.logit_indices == classes.logit_indices("imagenet_a")
    assert len(m.logit_indices) == 200 and m.logit_indices == sorted(m.logit_indices)
    assert m.classnames[5] == a[5]
    assert load_manifest("imagenet_a", tmp_path, sh_filter=True).labels.tolist() == [0, 5]  # TDA's lister

    r = subset_wnids("imagenet_r", 200)
    wnid_tree(tmp_path / "imagenet-r", [r[199], r[3]])
    assert load_manifest("imagenet_r", tmp_path).labels.tolist() == [3, 3, 199, 199]
    stranger = next(w for w in classes.IMAGENET_WNIDS if w not in r)
    wnid_tree(tmp_path / "imagenet-r", [stranger])
    with pytest.raises(ConfigError, match=f"holds folders \\['{stranger}'\\] that are not imagenet_r classes"):
        load_manifest("imagenet_r", tmp_path)
    (tmp_path / "imagenet-r" / stranger / "img_0.jpg").unlink()
    (tmp_path / "imagenet-r" / stranger / "img_1.jpg").unlink()
    (tmp_path / "imagenet-r" / stranger).rmdir()

    wnid_tree(tmp_path / "ImageNet-Sketch" / "sketch", [classes.IMAGENET_WNIDS[999], classes.IMAGENET_WNIDS[7]])
    assert load_manifest("imagenet_sketch", tmp_path).labels.tolist() == [7, 7, 999, 999]

    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    wnid_tree(v2, ["10", "2", "100"], per_class=1)
    m = load_manifest("imagenet_v2", tmp_path)
    assert [p.parent.name for p in m.paths] == ["10", "100", "2"]  # listed in string order, as ImageFolder
    assert m.labels.tolist() == [10, 100, 2]                       # mapped back to ImageNet indices
    assert classes.v2_folder_order()[:5] == [0, 1, 10, 100, 101]
    assert classes.v2_folder_order() == [int(s) for s in sorted(str(i) for i in range(1000))]


def test_list_file_data_sets(tmp_path):
    folder = tmp_path / "imagenet-d109"
    lines = []
    for k, (cls, label) in enumerate([("aircraft_carrier", 0), ("zebra", 108), ("aircraft_carrier", 0)]):
        save(folder / "clipart" / cls / f"clipart_{k}.jpg", 40, 40, k)
        lines.append(f"clipart/{cls}/clipart_{k}.jpg {label}")
    (folder / "clipart_list.txt").write_text("\n".join(lines) + "\n")
    m = load_manifest("imagenet_d109", tmp_path, domain="clipart")
    assert m.labels.tolist() == [0, 108, 0] and m.classnames[0] == "aircraft_carrier" and m.classnames[108] == "zebra"
    assert len(m.logit_indices) == 109 == len(set(m.logit_indices)) and m.domains[0] == "clipart"
    with pytest.raises(MissingFileError, match="list file for domain 'sketch' not found"):
        load_manifest("imagenet_d109", tmp_path, domain="sketch")
    (folder / "painting_list.txt").write_text("painting/a/missing.jpg 3\n")
    with pytest.raises(MissingFileError, match="1 of the 1 images listed in .*painting_list.txt are missing"):
        load_manifest("imagenet_d109", tmp_path, domain="painting")
    (folder / "real_list.txt").write_text("real/a/x.jpg 109\n")
    with pytest.raises(ConfigError, match="labels in \\[109, 109\\]; imagenet_d109 has 109 classes"):
        load_manifest("imagenet_d109", tmp_path, domain="real")

    dn = tmp_path / "domainnet126" / "domainnet126_lists"
    save(tmp_path / "domainnet126" / "real" / "cat" / "real_1.jpg", 40, 40, 1)
    dn.mkdir(parents=True)
    (dn / "real_list.txt").write_text("real/cat/real_1.jpg 28\n")
    m = load_manifest("domainnet126", tmp_path, domain="real")
    assert m.labels.tolist() == [28] and m.logit_indices is None and m.preprocess == "square256"


COOP = {  # name: (dataset folder, image folder, split file, example relative path, class name)
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Faces/image_0426.jpg", "face"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "banded/banded_0060.jpg", "banded"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "AnnualCrop/AnnualCrop_1048.jpg", "Annual Crop Land"),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "apple_pie/1011328.jpg", "apple_pie"),
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "image_00172.jpg", "passion flower"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "Abyssinian_201.jpg", "abyssinian"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "cars_test/00001.jpg",
                      "2007 Suzuki Aerio Sedan"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "a/abbey/sun_aaalbzqrimafwbiv.jpg", "abbey"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
               "Apply_Eye_Makeup"),
}


def make_coop(root: Path, name: str, folder=None, images=None, split_dir=None) -> None:
    dataset, default_images, split, rel, cname = COOP[name]
    folder, images = folder or dataset, default_images if images is None else images
    base = root / folder / images if images else root / folder
    other = f"other/{Path(rel).name}"
    save(base / rel, 32, 32, 0)
    save(base / other, 32, 32, 1)
    coop_split((split_dir or root / folder) / split, [[rel, 0, cname], [other, 1, "second class"]])


@pytest.mark.parametrize("name", sorted(COOP))
def test_coop_split_file_layouts(tmp_path, name):
    make_coop(tmp_path, name)
    m = load_manifest(name, tmp_path)
    assert m.labels.tolist() == [0, 1] and m.classnames == [COOP[name][4], "second class"]
    assert m.paths[0].is_file() and m.preprocess == "clip224"
    json_path = tmp_path / COOP[name][0] / COOP[name][2]
    json_path.unlink()
    with pytest.raises(MissingFileError, match=f"{name} split file {COOP[name][2]} not found"):
        load_manifest(name, tmp_path)


def test_tpt_layout_fgvc_aircraft_and_errors(tmp_path):
    # the TPT family's layout: JSON paths directly under the folder, split files in <root>/data_splits/
    make_coop(tmp_path, "caltech101", folder="Caltech101", images="", split_dir=tmp_path / "data_splits")
    assert load_manifest("caltech101", tmp_path).labels.tolist() == [0, 1]
    air = tmp_path / "fgvc_aircraft"
    (air / "variants.txt").parent.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA340-500\n")
    (air / "images_variant_test.txt").write_text("1025794 A340-500\n0034309 707-320\n")
    save(air / "images" / "1025794.jpg", 32, 32, 0)
    save(air / "images" / "0034309.jpg", 32, 32, 1)
    m = load_manifest("fgvc_aircraft", tmp_path)
    assert m.labels.tolist() == [1, 0] and m.classnames == ["707-320", "A340-500"]
    (air / "images_variant_test.txt").write_text("1025794 A380\n")
    with pytest.raises(ConfigError, match="variant 'A380' is not in"):
        load_manifest("fgvc_aircraft", tmp_path)
    with pytest.raises(MissingFileError, match="data set dtd not found under .*expected dtd/images/<images> with "
                                               "split_zhou_DescribableTextures.json in dtd/"):
        load_manifest("dtd", tmp_path)
    with pytest.raises(MissingFileError, match="data set imagenet_r not found under .*imagenet-r, "
                                               "imagenet-rendition/imagenet-r, ImageNet-R"):
        load_manifest("imagenet_r", tmp_path)
    coop_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]])
    (tmp_path / "dtd" / "images").mkdir()
    with pytest.raises(ConfigError, match="label 0 is named both 'x' and 'y'"):
        load_manifest("dtd", tmp_path)
    with pytest.raises(ConfigError, match="unknown folder data set 'imagenet-r'"):
        load_manifest("imagenet-r", tmp_path)


def test_restrict_outputs_equals_masking_the_logits():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))
    x = torch.rand(2, 3, 16, 16)
    full = net(x)
    idx = classes.logit_indices("imagenet_r")
    small = classes.restrict_outputs(net, idx)
    assert small is net and net[3].out_features == 200 and torch.allclose(small(x), full[:, idx])
    two_heads = nn.Sequential(nn.Flatten(), nn.Linear(12, 1000), nn.Linear(1000, 1000))
    wrapped = classes.restrict_outputs(two_heads, idx)
    assert isinstance(wrapped, classes.SubsetLogits) and wrapped(torch.rand(1, 3, 2, 2)).shape == (1, 200)


def test_configs_and_clip_names():
    from tta.models.clip import class_names, prompt_templates
    for path in sorted((ROOT / "configs").glob("*/base.yaml")):
        config.load(path)  # every data-set base config validates
    assert class_names("imagenet_r") == [class_names("imagenet")[i] for i in classes.logit_indices("imagenet_r")]
    assert len(class_names("imagenet_a")) == 200 and class_names("imagenet_a")[0] == "stingray"
    for name, n in [("caltech101", 100), ("dtd", 47), ("eurosat", 10), ("fgvc_aircraft", 100), ("food101", 101),
                    ("flowers102", 102), ("oxford_pets", 37), ("stanford_cars", 196), ("sun397", 397), ("ucf101", 101)]:
        assert len(class_names(name)) == n and not any("_" in c for c in class_names(name)), name
        assert "{}" in prompt_templates(f"coop1_{name}")[0]
    assert len(prompt_templates("tip7")) == 7 and prompt_templates("clip80") == prompt_templates("ensemble")
    for override, message in [("data.corruptions=[fog]", "has domains, not corruptions"),
                              ("data.source=generate", "makes corruptions of"),
                              ("data.decoder=opencv", "data.decoder must be one of"),
                              ("data.dataset=imagenet-r", "data.dataset must be one of")]:
        with pytest.raises(ConfigError, match=message):
            config.load(ROOT / "configs" / "imagenet_r" / "base.yaml", [override])
    assert set(available()) >= {"imagenet_val", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch",
                                "imagenet_d109", "domainnet126", *COOP, "fgvc_aircraft"}


def test_runner_on_imagenet_r_and_a_coop_set_with_clip(tmp_path):
    """ImageNet-R with a 1,000-class torchvision model scored on 200 outputs; DTD with a tiny CLIP whose class
    list comes from the config (model.options.classes: dtd)."""
    from tta.eval.runner import run_config
    from tta.models.clip import tiny_config
    r = subset_wnids("imagenet_r", 200)
    wnid_tree(tmp_path / "imagenet-r", [r[0], r[150]], side=64)
    base = {"device": "cpu", "progress": False, "setting": "continual", "output": {"save": False},
            "stream": {"batch_size": 2}, "method": {"name": "source"}}
    res = run_config({**base, "name": "r", "model": {"name": "torchvision:resnet18", "options": {"weights": None}},
                      "data": {"dataset": "imagenet_r", "data_dir": str(tmp_path), "source": "files", "workers": 0}})
    assert [(d["domain"], d["n"]) for d in res["domains"]] == [("imagenet_r", 4)]
    from tta.eval.runner import build_adapter
    cfg = config.from_dict({**base, "model": {"name": "torchvision:resnet18", "options": {"weights": None}},
                            "data": {"dataset": "imagenet_r", "data_dir": str(tmp_path)}})
    assert build_adapter(cfg, torch.device("cpu"))(torch.rand(1, 3, 64, 64)).shape == (1, 200)
    make_coop(tmp_path, "dtd")
    clip_model = {"name": "openclip:tta-test-tiny/none", "options": {"classes": "dtd", "templates": "coop1_dtd",
                                                                     "model_config": tiny_config()}}
    res = run_config({**base, "name": "d", "model": clip_model,
                      "data": {"dataset": "dtd", "data_dir": str(tmp_path), "source": "files", "workers": 0,
                               "preprocess": "clip224"}})
    assert res["domains"][0]["n"] == 2 and 0 <= res["mean_error"] <= 100


def test_data_layer_does_not_import_model_code():
    code = ("import sys, tta.data.streams, tta.data.domains, tta.data.folders, tta.data.ccc, tta.data.make_c\n"
            "print([m for m in sys.modules if m.startswith('tta.models')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
