"""The ``microrestore`` command: a thin layer over the core (and, later, the engine).

Every sub-command reads its inputs, computes everything, and only then writes its outputs
(atomically), so bad input exits non-zero with one line on stderr and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import __version__
from .core.errors import InputError

EXIT_BAD_INPUT = 2

_TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _read(path: str):
    from .core import io

    return io.read(path)


def _load_stack(path: str, what: str, ndim: Optional[int] = None) -> tuple[np.ndarray, object]:
    """Read ``path`` eagerly as float32, checking dimensions and finiteness."""
    img = _read(path)
    arr = np.asarray(img.data)
    if ndim is not None and arr.ndim != ndim:
        raise InputError(
            f"{what} {path} must have {ndim} dimensions; it has shape {arr.shape} "
            f"(axes {img.axes})"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} {path} contains NaN or infinite values")
    return arr, img


def _check_output(path: str, suffixes: Sequence[str] = _TIFF_SUFFIXES) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise InputError(
            f"output {path} must end in one of {', '.join(suffixes)}"
        )
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise InputError(f"output {path} is a folder; give a file name")
    return out


def _sibling(out: Path, suffix: str) -> Path:
    """``out`` with its suffix replaced, e.g. registered.tif -> registered.json."""
    return out.with_name(out.stem + suffix)


# --------------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------------
def _cmd_register(args: argparse.Namespace) -> int:
    from .core import io
    from .core.registration import register_burst

    out = _check_output(args.output)
    frames, img = _load_stack(args.input, "burst", ndim=3)
    if frames.shape[0] < 2:
        raise InputError(f"burst {args.input} has only one frame; registration needs at least 2")
    res = register_burst(frames, reference=args.reference, motion=args.motion)
    pixel_size, unit = img.yx_pixel_size, img.unit
    record = res.to_dict()
    record.update(source=str(args.input), output=str(out), version=__version__)
    json_path = Path(args.json) if args.json else _sibling(out, ".json")
    io.write_tiff(out, res.aligned, axes="TYX",
                  pixel_size=(1.0, *pixel_size) if pixel_size else None, unit=unit,
                  metadata={"registration": record})
    io.write_json(json_path, record)
    bad = int((~res.converged).sum())
    print(
        f"registered {frames.shape[0]} frames to frame {res.reference} ({res.motion}); "
        f"ECC min {float(np.min(res.ecc)):.3f}; {bad} not converged -> {out}, {json_path}"
    )
    for msg in res.messages:
        print(f"  warning: {msg}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------------------------
def _cmd_probe(args: argparse.Namespace) -> int:
    from .core import io
    from .core import probes

    if args.list:
        for name in probes.PROBES:
            print(name)
        return 0
    if not args.name:
        raise InputError(f"name a probe: one of {', '.join(probes.PROBES)}")
    if args.name not in probes.PROBES:
        raise InputError(f"unknown probe {args.name!r}; choose one of {', '.join(probes.PROBES)}")
    if args.output is None:
        raise InputError("give an output file with -o OUT.tif")
    out = _check_output(args.output)
    shape = tuple(args.shape)
    if len(shape) != 2 or min(shape) < 32:
        raise InputError(f"--shape needs two sizes of at least 32 px; got {args.shape}")
    rng = np.random.default_rng(args.seed)
    truth = probes.make_probe(args.name, shape, rng=rng)
    truth_path = _sibling(out, "_truth.tif")
    json_path = _sibling(out, ".json")
    if args.clean:
        io.write_tiff(out, truth, axes="YX")
        print(f"wrote the clean {args.name} probe {shape} -> {out}")
        return 0

    estimate = None
    source = None
    like = None
    if args.like:
        like, _ = _load_stack(args.like, "data to imitate")
        if like.ndim not in (2, 3):
            raise InputError(f"--like needs a (Y, X) frame or (T, Y, X) burst; got {like.shape}")
        source = str(args.like)
    if args.model:
        return _probe_with_model(args, out, shape, like, source)
    if like is not None:
        estimate = probes.estimate_degradation(like)
    overrides = {k: v for k, v in (("blur_length", args.blur_length),
                                   ("blur_angle", args.blur_angle),
                                   ("dose", args.dose)) if v is not None}
    burst = probes.degrade_probe(truth, estimate, n_frames=args.frames, rng=rng, **overrides)
    record = {
        "probe": args.name, "shape": list(shape), "seed": args.seed, "frames": args.frames,
        "like": source, "estimate": estimate.to_dict() if estimate is not None else None,
        "reference": int(burst.reference), "shifts": np.asarray(burst.shifts).tolist(),
        "params": burst.params, "version": __version__,
    }
    io.write_tiff(out, burst.frames, axes="TYX", metadata={"probe": record})
    io.write_tiff(truth_path, burst.ground_truth, axes="YX", metadata={"probe": record})
    io.write_json(json_path, record)
    print(f"wrote a {args.frames}-frame degraded {args.name} burst -> {out}; "
          f"ground truth -> {truth_path}; parameters -> {json_path}")
    return 0


def _probe_with_model(args: argparse.Namespace, out: Path, shape: tuple, like, source) -> int:
    """``probe NAME --model ID``: the Probes widget's experiment, headless (engine.probe)."""
    from .core import io
    from .engine.probe import describe_invented, run_probe

    res = run_probe(args.name, args.model, shape=shape, like=like,
                    blur_length=args.blur_length, blur_angle=args.blur_angle, dose=args.dose,
                    n_frames=args.frames, seed=args.seed, device=args.device)
    record = {"probe": res.provenance, "metrics": res.metrics, "invented": res.invented,
              "like": source, "restore": res.restore_provenance}
    truth_path, degraded_path = _sibling(out, "_truth.tif"), _sibling(out, "_degraded.tif")
    json_path = _sibling(out, ".json")
    io.write_tiff(out, res.restored, axes="YX", metadata={"probe": res.provenance})
    io.write_tiff(truth_path, res.truth, axes="YX")
    io.write_tiff(degraded_path, np.asarray(res.degraded, np.float32),
                  axes="TYX" if np.ndim(res.degraded) == 3 else "YX")
    io.write_json(json_path, _jsonable(record))
    print(f"{'':9} {'PSNR':>7} {'SSIM':>6} {'PCC':>6} {'invented':>9}")
    for name in ("degraded", "restored"):
        m, inv = res.metrics[name], res.invented[name]
        print(f"{name:9} {m['psnr']:7.2f} {m['ssim']:6.3f} {m['pcc']:6.3f} {inv['score']:9.4f}")
    print(f"restored: {describe_invented(res.invented['restored'])}")
    print(f"wrote restored -> {out}; truth -> {truth_path}; degraded -> {degraded_path}; "
          f"record -> {json_path}")
    return 0


def _jsonable(obj):
    """``obj`` with numpy scalars / arrays turned into plain Python for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def _as_2d_list(arr: np.ndarray, path: str) -> list[np.ndarray]:
    if arr.ndim == 2:
        return [arr]
    if arr.ndim == 3:
        return list(arr)
    raise InputError(f"{path} must be a (Y, X) image or a (Z, Y, X) stack; got shape {arr.shape}")


def _cmd_metrics(args: argparse.Namespace) -> int:
    from .core import metrics

    paths = list(args.images)
    ref_path = args.reference
    if ref_path is None and len(paths) == 2:
        paths, ref_path = paths[:1], paths[1]
    elif ref_path is None and len(paths) > 2:
        raise InputError("with more than two images, name the ground truth with --reference REF")
    mask = None
    if args.mask:
        m, _ = _load_stack(args.mask, "mask", ndim=2)
        mask = m > 0

    rows = []
    if ref_path is not None:
        ref_arr, _ = _load_stack(ref_path, "reference")
        refs = _as_2d_list(ref_arr, ref_path)
        for p in paths:
            arr, _ = _load_stack(p, "image")
            imgs = _as_2d_list(arr, p)
            if len(refs) not in (1, len(imgs)):
                raise InputError(
                    f"{p} has {len(imgs)} slices but the reference has {len(refs)}; "
                    "give a 2-D reference or one with as many slices"
                )
            for i, im in enumerate(imgs):
                ref = refs[i] if len(refs) > 1 else refs[0]
                if im.shape != ref.shape:
                    raise InputError(
                        f"{p} has slices of shape {im.shape} but the reference {ref.shape}"
                    )
                r = metrics.compare(im, ref, mask=mask, border=args.border, fit=args.fit,
                                    data_range=args.data_range)
                rows.append({"image": p, "slice": i if len(imgs) > 1 else None, **r})
        cols = ["psnr", "ssim", "pcc"] + (["gain", "offset"] if args.fit else [])
    else:
        for p in paths:
            arr, _ = _load_stack(p, "image")
            imgs = _as_2d_list(arr, p)
            for i, im in enumerate(imgs):
                r = metrics.no_reference(im, mask=mask)
                rows.append({"image": p, "slice": i if len(imgs) > 1 else None, **r})
        cols = ["noise", "sharpness", "snr"]

    if args.json:
        # JSON has no infinity: identical images (PSNR inf) are written as null
        clean = [{k: (None if isinstance(v, float) and math.isinf(v) else v)
                  for k, v in r.items()} for r in rows]
        print(json.dumps({"reference": ref_path, "rows": clean}, indent=2))
        return 0
    header = ["image", "slice"] + cols
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        cells = [r["image"], "" if r["slice"] is None else str(r["slice"])]
        cells += [f"{r[c]:.4f}" if not math.isinf(r[c]) else "inf" for c in cols]
        print("| " + " | ".join(cells) + " |")
    if ref_path is not None:
        print(f"(reference: {ref_path})")
    return 0


# --------------------------------------------------------------------------------------------
# models / restore
# --------------------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    from .models.zoo import list_cards

    rows = [c.summary() for c in list_cards()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["id", "task", "inputs", "scale", "training data", "metrics", "source"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


def _parse_sections(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sections must be comma-separated integers, e.g. 3,7; got {text!r}")


def _cmd_restore(args: argparse.Namespace) -> int:
    from .core import io
    from .engine.restore import restore
    from .models.zoo import get_card

    out = _check_output(args.output)
    card = get_card(args.model)
    sections = _parse_sections(args.sections)
    data, img = _load_stack(args.input, "input")
    masks = None
    if args.masks:
        masks_arr, _ = _load_stack(args.masks, "artefact masks")
        masks = masks_arr > 0
    res = restore(data, card, device=args.device, reference=args.reference,
                  register=not args.no_register, sections=sections, masks=masks,
                  motion_angle=args.motion_angle, ensemble=args.ensemble)
    yx = img.yx_pixel_size
    if yx and card.scale != 1:
        yx = (yx[0] / card.scale, yx[1] / card.scale)
    out_axes = "YX" if res.image.ndim == 2 else img.axes[-3:]
    pixel_size = None
    if yx:
        pixel_size = yx if res.image.ndim == 2 else (
            (img.pixel_size[-3] if img.pixel_size else 1.0), *yx)
    prov = dict(res.provenance, source=str(args.input))
    io.write_tiff(out, res.image, axes=out_axes, pixel_size=pixel_size, unit=img.unit,
                  metadata={"provenance": prov})
    io.write_json(_sibling(out, ".json"), prov)
    print(f"restored {args.input} with {card.id} on {prov['device']} in {prov['seconds']} s "
          f"-> {out} {tuple(res.image.shape)}")
    return 0


def _text_bar(width: int = 30) -> Callable[[float, str], None]:
    """A progress callback drawing ``[#####.....] message`` on stderr (one line, redrawn)."""
    t0 = time.perf_counter()

    def show(fraction: float, message: str) -> None:
        n = round(fraction * width)
        eta = ""
        elapsed = time.perf_counter() - t0
        if 0 < fraction < 1:
            eta = f", {elapsed * (1 - fraction) / fraction:.0f} s left"
        end = "\n" if fraction >= 1 else ""
        print(f"\r[{'#' * n}{'.' * (width - n)}] {message} {elapsed:.0f} s{eta}   ",
              end=end, file=sys.stderr, flush=True)

    return show


def _cmd_batch(args: argparse.Namespace) -> int:
    from .engine.batch import run_batch

    summary = run_batch(
        args.inputs, args.output, args.model, device=args.device, workers=args.workers,
        threads=args.threads, scheduler=args.scheduler, block=args.block, window=args.window,
        register=not args.no_register, overwrite=args.overwrite, verify=args.verify,
        retries=args.retries, max_blocks=args.max_blocks, ensemble=args.ensemble,
        progress=None if args.quiet else _text_bar())
    print(summary.text())
    if summary.interrupted:
        return 130
    return 0 if summary.complete else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.train import load_config, train
    from .models.zoo import PACKAGE_ZOO, user_model_dir

    cfg = load_config(args.config)
    if args.threads:
        cfg["train"]["threads"] = args.threads
    workdir = Path(args.workdir or Path("runs") / cfg["id"])
    export = Path(args.export) if args.export else (PACKAGE_ZOO if args.to_zoo else user_model_dir())

    def show(u):
        if u.val is not None or u.step % args.log_every == 0:
            val = (f" | val PSNR {u.val['psnr']:.2f} SSIM {u.val['ssim']:.4f} "
                   f"(mean {u.val['mean_psnr']:.2f} / {u.val['mean_ssim']:.4f})" if u.val else "")
            terms = " ".join(f"{k} {v:.3g}" for k, v in u.terms.items())
            print(f"step {u.step}/{u.steps} loss {u.loss:.4f} ({terms}) {u.seconds:.0f}s{val}",
                  flush=True)

    res = train(cfg, workdir, max_minutes=args.max_minutes, on_update=show, export_dir=export,
                device=args.device)
    if res.card is not None:
        select = str(cfg["train"].get("select", "ssim"))
        print(f"best step {res.best['step']} (val {select.upper()} {res.best[select]:.4f}, "
              f"the score train.select picks by); exported {res.card.id} -> {res.card.path}")
    return 0


_ANY_MOTION = (0.0, 180.0)
_ENSEMBLES = ("none", "flips", "dihedral")   # models.zoo.ENSEMBLE_NAMES (not imported here)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import yaml

    from .engine.evaluate import evaluate
    from .models.zoo import get_card

    card = get_card(args.model)
    if args.write_card and args.ensemble not in (None, card.ensemble):
        raise InputError(f"--write-card stores the metrics of the card's own set-up (self-"
                         f"ensemble {card.ensemble!r}); set input.ensemble in {card.path} "
                         f"instead of --ensemble {args.ensemble}")
    t0 = time.perf_counter()
    res = evaluate(card, device=args.device, seed=args.seed, ensemble=args.ensemble, **(
        {"n_bursts": args.bursts, "size": args.size, "frames": args.frames,
         "blur_angle": tuple(args.motion_angle)}
        if card.is_burst else {}))
    v = res["values"]
    if card.is_burst:
        print(f"{card.id}: PSNR {v['psnr']:.2f} dB (registered mean {v['mean_psnr']:.2f}, gain "
              f"{v['gain_over_mean_db']:+.2f} dB), SSIM {v['ssim']:.4f} (mean "
              f"{v['mean_ssim']:.4f}) on {args.bursts} held-out bursts")
    else:
        print(f"{card.id}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
        for level, row in res.get("per_level", {}).items():
            print(f"  {level}: " + ", ".join(f"{k} {val}" for k, val in row.items()))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        from .core import io

        io.write_json(args.json, res)
    if args.write_card:
        d = yaml.safe_load(card.path.read_text(encoding="utf-8"))
        cmd = (f"microrestore evaluate {card.id} --seed {args.seed} --write-card" + (
            f" --bursts {args.bursts} --size {args.size} --frames {args.frames}"
            + ("" if tuple(args.motion_angle) == _ANY_MOTION else
               " --motion-angle {:g} {:g}".format(*args.motion_angle))
            if card.is_burst else ""))
        d["metrics"] = {"command": cmd, "split": res["protocol"]["split"],
                        "protocol": res["protocol"], "values": v}
        if "per_level" in res:
            d["metrics"]["per_level"] = res["per_level"]
        # plain floats for YAML (numpy scalars do not serialise)
        d["metrics"] = json.loads(json.dumps(d["metrics"], default=float))
        from .core.io import write_bytes

        write_bytes(card.path, yaml.safe_dump(d, sort_keys=False).encode("utf-8"))
        print(f"wrote metrics into {card.path}")
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microrestore",
        description="Restore degraded microscopy images: register TEM bursts, restore them "
                    "with the model zoo, make synthetic probes, measure quality.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "register", help="register a burst of frames to a reference frame (phase correlation + ECC)",
        description="Register a (T, Y, X) burst to its reference frame. Writes the registered "
                    "stack (TIFF) and a JSON with each frame's 2x3 transform (reference pixel "
                    "coordinates to frame coordinates), ECC correlation and convergence flag.",
    )
    r.add_argument("input", help="(T, Y, X) frames: TIFF, MRC, DM3/DM4, SER, EMD, or a folder of TIFFs")
    r.add_argument("-o", "--output", required=True, help="registered stack, .tif")
    r.add_argument("--reference", type=int, default=None,
                   help="index of the reference frame (default: the middle frame, T//2)")
    r.add_argument("--motion", choices=("translation", "euclidean", "affine"),
                   default="translation", help="motion model (default: translation)")
    r.add_argument("--json", default=None,
                   help="where to write the transforms (default: OUTPUT with .json)")
    r.set_defaults(func=_cmd_register)

    pr = sub.add_parser(
        "probe", help="synthetic test patterns, degraded like real data, with ground truth",
        description="Make a synthetic probe (known ground truth) and degrade it into a burst: "
                    "with the blur and noise estimated from your data (--like) or given. "
                    "Writes OUT (T, Y, X burst), OUT_truth.tif and OUT.json.",
    )
    pr.add_argument("name", nargs="?", help="probe name (see --list)")
    pr.add_argument("-o", "--output", help="degraded burst, .tif")
    pr.add_argument("--list", action="store_true", help="list the probes and exit")
    pr.add_argument("--shape", type=int, nargs=2, default=(512, 512), metavar=("Y", "X"))
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--frames", type=int, default=5, help="frames in the burst (default 5)")
    pr.add_argument("--like", help="a real burst or frame whose blur and noise to imitate")
    pr.add_argument("--blur-length", type=float, help="motion blur length in px")
    pr.add_argument("--blur-angle", type=float, help="motion direction, degrees from +x towards +y")
    pr.add_argument("--dose", type=float, help="mean electron counts per pixel")
    pr.add_argument("--clean", action="store_true", help="write only the clean pattern")
    pr.add_argument("--model", help="restore the degraded probe with this model and score it "
                                    "(writes OUT = restored, OUT_truth.tif, OUT_degraded.tif, "
                                    "OUT.json with metrics and invented structure)")
    pr.add_argument("--device", default="auto", help="device for --model (default auto)")
    pr.set_defaults(func=_cmd_probe)

    m = sub.add_parser(
        "metrics", help="PSNR / SSIM / PCC against a reference, or no-reference noise and sharpness",
        description="Score images. 'metrics A B' scores A against the ground truth B; "
                    "'metrics A B C --reference R' scores each against R; 'metrics A' alone "
                    "gives no-reference estimates (noise std, sharpness, SNR). Stacks are scored "
                    "slice by slice.",
    )
    m.add_argument("images", nargs="+", help="images to score")
    m.add_argument("--reference", help="ground-truth image")
    m.add_argument("--mask", help="2-D mask image: score only where it is non-zero")
    m.add_argument("--border", type=int, default=0, help="ignore this many pixels at each edge")
    m.add_argument("--fit", action="store_true",
                   help="fit the best gain + offset to the reference before scoring")
    m.add_argument("--data-range", type=float, default=None,
                   help="data range for PSNR/SSIM (default: the reference's max - min)")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=_cmd_metrics)

    mo = sub.add_parser("models", help="list the model zoo and your own models",
                        description="Table of the models: id, task, inputs, scale, training "
                                    "data, metrics (shipped zoo and your model folder).")
    mo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mo.set_defaults(func=_cmd_models)

    rs = sub.add_parser(
        "restore", help="restore a burst, an image/stack or an ssTEM stack with a zoo model",
        description="Burst models: IN is (T, Y, X) raw frames, registered to the reference "
                    "frame and restored into one (Y, X) image in its coordinates. Single-image "
                    "models: IN is (Y, X) or a stack (restored slice by slice). ssTEM models: IN "
                    "is a (Z, Y, X) stack; --sections (or the detected missing ones) are restored.",
    )
    rs.add_argument("input")
    rs.add_argument("-o", "--output", required=True, help="restored image, .tif (+ .json provenance)")
    rs.add_argument("--model", required=True, help="model id (see 'microrestore models') or card path")
    rs.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    rs.add_argument("--reference", type=int, default=None, help="reference frame (default T//2)")
    rs.add_argument("--no-register", action="store_true", help="frames are already registered")
    rs.add_argument("--motion-angle", type=float, default=None,
                    help="burst models: direction the stage moved, degrees from +x towards +y "
                         "(90 = along the columns; default: from the registration, else from "
                         "the motion blur)")
    rs.add_argument("--ensemble", choices=_ENSEMBLES, default=None,
                    help="learned models: average over flipped (flips, 4 passes) or also "
                         "transposed (dihedral, 8 passes; not burst nets) copies of the input "
                         "(default: the card's input.ensemble, else none)")
    rs.add_argument("--sections", default=None, help="ssTEM: comma-separated sections to restore")
    rs.add_argument("--masks", default=None,
                    help="ssTEM: (Z, Y, X) artefact masks (non-zero = fold / precipitate)")
    rs.set_defaults(func=_cmd_restore)

    bt = sub.add_parser(
        "batch", help="restore a long stream or a large stack / mosaic in blocks into OME-Zarr "
                      "(Dask distributed, resumable)",
        description="Burst models: the input is a (T, Y, X) stream (one file, a folder of "
                    "frames or several frame files) and every frame is restored as the centre "
                    "of its burst window. Single-image models: a (Y, X) mosaic or (Z, Y, X) "
                    "stack restored in blocks with halos. Blocks run on an embedded Dask "
                    "LocalCluster (--workers) or an existing cluster (--scheduler) and are "
                    "written into their own chunks of OUT.zarr (OME-Zarr 0.4) with a completion "
                    "record each: re-running the same command resumes, skipping finished "
                    "blocks. Exit 1 if blocks failed after their retries, 130 if interrupted.",
    )
    bt.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="a stream or stack file, a folder of TIFF frames, or several frames")
    bt.add_argument("-o", "--output", required=True, help="OUT.zarr folder (OME-Zarr)")
    bt.add_argument("--model", required=True, help="model id (see 'microrestore models')")
    bt.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    bt.add_argument("--workers", type=int, default=None,
                    help="local worker processes (default: cores/4, 1 with a GPU; 0: run in "
                         "this process without Dask)")
    bt.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: cores / workers)")
    bt.add_argument("--scheduler", default=None,
                    help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    bt.add_argument("--block", type=int, default=None,
                    help="output frames per block (streams) or block edge in pixels (stacks)")
    bt.add_argument("--window", type=int, default=None,
                    help="frames per burst window (default: the model's default)")
    bt.add_argument("--no-register", action="store_true", help="frames are already registered")
    bt.add_argument("--ensemble", choices=_ENSEMBLES, default=None,
                    help="self-ensemble of every restore (see restore; default: the card's)")
    bt.add_argument("--overwrite", action="store_true",
                    help="replace OUT.zarr instead of resuming it")
    bt.add_argument("--verify", action="store_true",
                    help="when resuming, re-check finished blocks against their sha256")
    bt.add_argument("--retries", type=int, default=2, help="extra attempts per failing block")
    bt.add_argument("--max-blocks", type=int, default=None,
                    help="restore at most this many blocks now (resume later)")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")
    bt.set_defaults(func=_cmd_batch)

    tr = sub.add_parser("train", help="train a network from a YAML config (checkpoints, resume)",
                        description="Train the network a config describes on simulated data from "
                                    "../shared/data; reruns resume from WORKDIR/last.pt; the best "
                                    "checkpoint by the validation score train.select (SSIM by "
                                    "default) is exported with its card.")
    tr.add_argument("config")
    tr.add_argument("--workdir", help="checkpoints (default runs/<id>)")
    tr.add_argument("--max-minutes", type=float, default=None, help="stop (resumable) after this")
    tr.add_argument("--export", help="folder for the exported card + weights (default: your "
                                     "model folder)")
    tr.add_argument("--to-zoo", action="store_true", help="export into the package's zoo/")
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--threads", type=int, default=None, help="CPU threads (default: config)")
    tr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="score a model on held-out data (the model cards' metrics)",
                        description="Held-out data (never trained on), restored as 'restore' "
                                    "would, scored after a gain + offset fit with a 24 px border "
                                    "against the classical answer: burst models vs the "
                                    "ECC-registered mean of the same frames; sr2x vs bicubic; "
                                    "defocus vs the input at every real defocus level; ssTEM vs "
                                    "the neighbour average (missing) and the damaged input.")
    ev.add_argument("model")
    ev.add_argument("--bursts", type=int, default=24)
    ev.add_argument("--size", type=int, default=256)
    ev.add_argument("--frames", type=int, default=5)
    ev.add_argument("--motion-angle", type=float, nargs=2, default=list(_ANY_MOTION),
                    metavar=("LO", "HI"),
                    help="burst models: stage-motion directions drawn uniformly from LO-HI "
                         "degrees (from +x towards +y; default 0 180: any direction)")
    ev.add_argument("--ensemble", choices=_ENSEMBLES, default=None,
                    help="self-ensemble to restore with (default: the card's; see restore)")
    ev.add_argument("--seed", type=int, default=2021)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", help="write all numbers to this JSON file")
    ev.add_argument("--write-card", action="store_true", help="store the metrics in the card")
    ev.set_defaults(func=_cmd_evaluate)

    nap = sub.add_parser(
        "napari", help="start napari with MALLOC_ARENA_MAX=1 (faster CPU work in threads)",
        description="Start napari with MALLOC_ARENA_MAX=1 in its environment. The plugin's "
                    "CPU restores run on the main thread of its compute process whatever the "
                    "environment (Restore widget 1.10-1.18x a plain process on 2 cores, "
                    "benchmarks/bench_worker.py). What still computes in napari's worker "
                    "threads (fine-tuning, probes; everything with MICRORESTORE_CPU_PROCESS=0) "
                    "allocates from glibc thread arenas, whose heaps hold at most 64 MB, so "
                    "large tensors are mapped and page-faulted afresh in every layer there; one "
                    "arena for every thread spares them that (a restore in a worker thread: "
                    "sr2x 1.92x -> 1.26x, tem-single 1.72x -> 1.37x a plain process). Other "
                    "arguments go to napari.")
    nap.add_argument("napari_args", nargs=argparse.REMAINDER, help="passed on to napari")
    nap.set_defaults(func=_cmd_napari)
    return p


def _cmd_napari(args: argparse.Namespace) -> int:
    import shutil

    exe = shutil.which("napari")
    if exe is None:
        raise InputError('napari is not installed here; pip install "napari-microrestore[napari]"')
    env = dict(os.environ)
    env.setdefault("MALLOC_ARENA_MAX", "1")
    os.execve(exe, [exe, *args.napari_args], env)  # replaces this process; returns only on error
    return 0  # pragma: no cover


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return func(args)
    except InputError as e:
        print(f"microrestore {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"microrestore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
