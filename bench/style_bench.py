"""Neural style transfer: jobs.style against the reference code, side by side, same inputs.

The reference is a faithful copy of the spec's code (d2l "Neural Style Transfer"): a
per-layer Python loop over `nn.Sequential(vgg19.features[:29])` whose weights keep
`requires_grad=True` (so every backward also computes weight gradients), Adam + StepLR on
a `SynthesizedImage` parameter, features of the synthesized image recomputed each step.
Both sides get the same VGG weights (torchvision's initialisation under a fixed seed:
ImageNet weights cannot be downloaded here), the same preprocessed inputs and the same
initialisation (the content image).

Phases (run each under `flock -x /tmp/heavy.lock`):
  ref500  reference, 500 Adam steps: per-step times and losses, loss after the 500th update
  steps   per-step time, reference vs jobs.style variants, `--repeats` runs of `--steps` steps,
          and the relative loss differences of those steps
  lbfgs   jobs.style L-BFGS loss-vs-time curves (time budget from the steps phase); with ref500
          present, the time each curve needs to reach the reference loss after 500 steps
Results go to `--out` (JSON, one key per phase; phases merge into an existing file).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs import style as S  # noqa: E402
from jobs.images import load_image  # noqa: E402
from jobs.precision import cpu_features  # noqa: E402
from jobs.vgg import load_vgg  # noqa: E402

# ----------------------------------------------------------------------------- reference (d2l)


class Reference:
    """d2l's style transfer, kept line for line; only the plotting is dropped."""

    def __init__(self, features_state: dict, content_img, style_img, image_shape=(300, 450)):
        pretrained_net = torchvision.models.vgg19()
        pretrained_net.features.load_state_dict(features_state)  # same weights as jobs.style
        self.style_layers, self.content_layers = [0, 5, 10, 19, 28], [25]
        self.net = nn.Sequential(*[pretrained_net.features[i] for i in
                                   range(max(self.content_layers + self.style_layers) + 1)])
        self.content_weight, self.style_weight, self.tv_weight = 1, 1e3, 10
        self.content_X, self.contents_Y = self.get_contents(content_img, image_shape)
        _, self.styles_Y = self.get_styles(style_img, image_shape)

    def preprocess(self, img, image_shape):
        rgb_mean = torch.tensor([0.485, 0.456, 0.406])
        rgb_std = torch.tensor([0.229, 0.224, 0.225])
        transforms = torchvision.transforms.Compose([
            torchvision.transforms.Resize(image_shape),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(mean=rgb_mean, std=rgb_std)])
        return transforms(img).unsqueeze(0)

    def extract_features(self, X, content_layers, style_layers):
        contents = []
        styles = []
        for i in range(len(self.net)):
            X = self.net[i](X)
            if i in style_layers:
                styles.append(X)
            if i in content_layers:
                contents.append(X)
        return contents, styles

    def get_contents(self, content_img, image_shape):
        content_X = self.preprocess(content_img, image_shape)
        contents_Y, _ = self.extract_features(content_X, self.content_layers, self.style_layers)
        return content_X, contents_Y

    def get_styles(self, style_img, image_shape):
        style_X = self.preprocess(style_img, image_shape)
        _, styles_Y = self.extract_features(style_X, self.content_layers, self.style_layers)
        return style_X, styles_Y

    @staticmethod
    def content_loss(Y_hat, Y):
        return torch.square(Y_hat - Y.detach()).mean()

    @staticmethod
    def gram(X):
        num_channels, n = X.shape[1], X.numel() // X.shape[1]
        X = X.reshape((num_channels, n))
        return torch.matmul(X, X.T) / (num_channels * n)

    def style_loss(self, Y_hat, gram_Y):
        return torch.square(self.gram(Y_hat) - gram_Y.detach()).mean()

    @staticmethod
    def tv_loss(Y_hat):
        return 0.5 * (torch.abs(Y_hat[:, :, 1:, :] - Y_hat[:, :, :-1, :]).mean() +
                      torch.abs(Y_hat[:, :, :, 1:] - Y_hat[:, :, :, :-1]).mean())

    def compute_loss(self, X, contents_Y_hat, styles_Y_hat, contents_Y, styles_Y_gram):
        contents_l = [self.content_loss(Y_hat, Y) * self.content_weight for Y_hat, Y in zip(
            contents_Y_hat, contents_Y)]
        styles_l = [self.style_loss(Y_hat, Y) * self.style_weight for Y_hat, Y in zip(
            styles_Y_hat, styles_Y_gram)]
        tv_l = self.tv_loss(X) * self.tv_weight
        l = sum(styles_l + contents_l + [tv_l])
        return contents_l, styles_l, tv_l, l

    def train(self, lr=0.3, num_epochs=500, lr_decay_epoch=50, final_loss=False, log=None):
        """Returns per-step records (losses before each update, cumulative wall and CPU seconds)."""
        gen_img = SynthesizedImage(self.content_X.shape)
        gen_img.weight.data.copy_(self.content_X.data)
        trainer = torch.optim.Adam(gen_img.parameters(), lr=lr)
        styles_Y_gram = [self.gram(Y) for Y in self.styles_Y]
        X = gen_img()
        scheduler = torch.optim.lr_scheduler.StepLR(trainer, lr_decay_epoch, 0.8)
        records, t0, c0 = [], time.perf_counter(), time.process_time()
        for epoch in range(num_epochs):
            trainer.zero_grad()
            contents_Y_hat, styles_Y_hat = self.extract_features(X, self.content_layers, self.style_layers)
            contents_l, styles_l, tv_l, l = self.compute_loss(
                X, contents_Y_hat, styles_Y_hat, self.contents_Y, styles_Y_gram)
            l.backward()
            trainer.step()
            scheduler.step()
            records.append({"step": epoch, "time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                            "content": sum(contents_l).item(), "style": sum(styles_l).item(),
                            "tv": tv_l.item(), "total": l.item()})
            if log is not None:  # a long run leaves its progress behind
                log.write(json.dumps(records[-1]) + "\n")
                log.flush()
        out = {"records": records, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        if final_loss:  # the loss of the image after the last update (one extra evaluation, untimed)
            with torch.no_grad():
                c, s = self.extract_features(X, self.content_layers, self.style_layers)
                out["final"] = dict(zip(("content", "style", "tv", "total"),
                                        (float(sum(v)) if isinstance(v, list) else float(v)
                                         for v in self.compute_loss(X, c, s, self.contents_Y, styles_Y_gram))))
        return out


class SynthesizedImage(nn.Module):
    def __init__(self, img_shape, **kwargs):
        super(SynthesizedImage, self).__init__(**kwargs)
        self.weight = nn.Parameter(torch.rand(*img_shape))

    def forward(self):
        return self.weight


# ----------------------------------------------------------------------------- phases


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b|, 0 when both are 0."""
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-30)


def run_ours(cfg: S.StyleConfig, content, style, features) -> dict:
    """jobs.style for cfg.steps steps; the extractor is built outside the timed region."""
    ext = S.build_extractor(cfg, copy.deepcopy(features))
    t0, c0 = time.perf_counter(), time.process_time()

    def progress(rec):
        rec["cpu_s"] = time.process_time() - c0

    _, history = S.stylize(content, style, cfg, extractor=ext, progress=progress)
    return {"records": history, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def per_step(records: list[dict], key: str = "time_s") -> float:
    """Median seconds per step, from the cumulative times, leaving out the first (warm-up) step."""
    t = [r[key] for r in records]
    return statistics.median([b - a for a, b in zip(t, t[1:])])


def phase_ref500(args, content, style, features) -> dict:
    ref = Reference(features.state_dict(), content, style, tuple(args.size))
    with open(args.out + ".ref500.jsonl", "w") as log:
        out = ref.train(num_epochs=args.ref_steps, final_loss=True, log=log)
    print(f"reference {args.ref_steps} steps: {out['seconds']:.1f}s, final loss {out['final']}", flush=True)
    return {"steps": args.ref_steps, "seconds": out["seconds"], "cpu_seconds": out["cpu_seconds"],
            "final": out["final"], "per_step_s": per_step(out["records"]),
            "per_step_cpu_s": per_step(out["records"], "cpu_s"), "records": out["records"]}


VARIANTS = {  # jobs.style's default, precision "auto", is bf16 on a CPU with native bf16 and fp32 + Winograd elsewhere
    "fp32 winograd": dict(winograd=True, precision="fp32"),  # NNPACK's kernels, NCHW (jobs.fastconv)
    "fp32 channels_last": dict(winograd=False, channels_last=True, precision="fp32"),
    "fp32 NCHW": dict(winograd=False, channels_last=False, precision="fp32"),  # left out with --quick
    "bf16 autocast, channels_last": dict(channels_last=True, precision="bf16"),
}


def phase_steps(args, content, style, features) -> dict:
    runs: dict[str, list] = {"reference": []}
    for _ in range(args.repeats):
        ref = Reference(features.state_dict(), content, style, tuple(args.size))
        r = ref.train(num_epochs=args.steps)
        runs["reference"].append(r)
        print(f"reference: {per_step(r['records']):.3f} s/step", flush=True)
        for name, kw in VARIANTS.items():
            if (args.quick and name == "fp32 NCHW") or name not in args.variants:
                continue
            cfg = S.StyleConfig(size=list(args.size), steps=args.steps, weights="random", **kw)
            o = run_ours(cfg, content, style, features)
            runs.setdefault(name, []).append(o)
            print(f"{name}: {per_step(o['records']):.3f} s/step", flush=True)
    ref_s = statistics.median(per_step(r["records"]) for r in runs["reference"])
    ref_c = statistics.median(per_step(r["records"], "cpu_s") for r in runs["reference"])
    ref_losses = runs["reference"][0]["records"]
    summary = {}
    for name, rs in runs.items():
        s = statistics.median(per_step(r["records"]) for r in rs)
        diffs = {k: max(rel_diff(a[k], b[k]) for a, b in zip(rs[0]["records"], ref_losses))
                 for k in ("content", "style", "tv", "total")}
        c = statistics.median(per_step(r["records"], "cpu_s") for r in rs)
        summary[name] = {"per_step_s": s, "per_step_all": [per_step(r["records"]) for r in rs],
                         "speedup": ref_s / s, "per_step_cpu_s": c, "speedup_cpu": ref_c / c,
                         "per_step_cpu_all": [per_step(r["records"], "cpu_s") for r in rs], "max_rel_loss_diff_first_steps": diffs,
                         "losses_first_run": [{k: r[k] for k in ("content", "style", "tv", "total")}
                                              for r in rs[0]["records"]]}
        print(f"{name:32s} {s:.3f} s/step  x{ref_s / s:.2f} wall  x{ref_c / c:.2f} cpu  max rel loss diff {diffs}",
              flush=True)
    return {"steps": args.steps, "repeats": args.repeats, "summary": summary}


def phase_lbfgs(args, content, style, features, ref_per_step_s: float) -> dict:
    """L-BFGS loss-vs-time curves, each run for `--lbfgs-budget` x (500 x reference s/step)."""
    budget = args.lbfgs_budget * 500 * ref_per_step_s
    out = {"budget_s": budget, "runs": {}}
    variants = {"single": ("lbfgs 300x450", dict(scales=[1.0])),
                "coarse-to-fine": ("lbfgs 150x225 -> 300x450", dict(scales=[0.5, 1.0]))}
    chosen = variants.values() if args.lbfgs_variants == "both" else [variants[args.lbfgs_variants]]
    for name, kw in chosen:
        curves = []
        for _ in range(args.lbfgs_repeats):
            cfg = S.StyleConfig(size=list(args.size), steps=args.lbfgs_steps, optimizer="lbfgs", weights="random", **kw)
            ext = S.build_extractor(cfg, copy.deepcopy(features))
            t0, c0, curve = time.perf_counter(), time.process_time(), []

            def progress(rec, last_scale=len(cfg.scales) - 1):
                rec["cpu_s"], rec["wall_s"] = time.process_time() - c0, time.perf_counter() - t0
                curve.append({k: rec[k] for k in ("scale", "step", "wall_s", "cpu_s", "content", "style", "tv", "total")})
                if rec["wall_s"] > budget:
                    raise StopIteration

            try:
                S.stylize(content, style, cfg, extractor=ext, progress=progress)
            except StopIteration:
                pass
            last = [r for r in curve if r["scale"] == len(cfg.scales) - 1]
            print(f"{name}: {len(curve)} evaluations in {curve[-1]['wall_s']:.1f}s, "
                  f"best loss at full size {min(r['total'] for r in last):.5g}", flush=True)
            curves.append(curve)
        out["runs"][name] = {"scales": kw["scales"], "curves": curves}
    return out


def time_to_reach(curve: list[dict], target: float, last_scale: int, key: str = "wall_s") -> float:
    """Seconds until an evaluation at the full size has loss <= target (inf when never)."""
    return next((r[key] for r in curve if r["scale"] == last_scale and r["total"] <= target), float("inf"))


def lbfgs_summary(results: dict) -> dict:
    """Time-to-target of each L-BFGS curve against the reference's loss after its run."""
    ref = results["ref500"]
    done = len(ref["records"])
    target = ref["final"]["total"]
    out = {"reference_steps": done, "target_loss": target, "reference_seconds": ref["seconds"],
           "reference_cpu_seconds": ref["cpu_seconds"]}
    for name, run in results["lbfgs"]["runs"].items():
        last = len(run["scales"]) - 1
        wall = [time_to_reach(c, target, last) for c in run["curves"]]
        cpu = [time_to_reach(c, target, last, "cpu_s") for c in run["curves"]]
        out[name] = {"seconds_all": wall, "cpu_seconds_all": cpu, "seconds": statistics.median(wall),
                     "fraction_of_reference_wall": statistics.median(wall) / ref["seconds"],
                     "fraction_of_reference_cpu": statistics.median(cpu) / ref["cpu_seconds"]}
        print(f"{name}: reaches {target:.5g} in {statistics.median(wall):.1f}s wall "
              f"({out[name]['fraction_of_reference_wall']:.3f} of the reference's {ref['seconds']:.1f}s), "
              f"CPU fraction {out[name]['fraction_of_reference_cpu']:.3f}", flush=True)
        out[name]["per_term"] = per_term(run, ref["final"], last)
        for t in out[name]["per_term"]:
            print(f"  per term: {t}", flush=True)
    return out


TERMS = ("content", "style", "tv")


def per_term(run: dict, final: dict, last_scale: int) -> list[dict]:
    """Each curve's content, style and TV terms against the reference's final ones: at the first
    full-size evaluation whose total reaches the reference's total, at the curve's end, and the
    seconds until content and style are both at or below the reference's (inf when never). The
    total alone can mislead: with random VGG weights the TV term is ~98% of it, and upsampling
    between scales halves TV, so a total reached says little about the style and content terms."""
    rows = []
    for curve in run["curves"]:
        full = [r for r in curve if r["scale"] == last_scale]
        at_total = next((r for r in full if r["total"] <= final["total"]), None)
        both = next((r["wall_s"] for r in full if r["content"] <= final["content"] and r["style"] <= final["style"]),
                    float("inf"))
        rows.append({"at_total": None if at_total is None else {k: at_total[k] / final[k] for k in TERMS},
                     "at_end": {k: full[-1][k] / final[k] for k in TERMS} if full else None,
                     "end_s": full[-1]["wall_s"] if full else None,
                     "content_and_style_reached_s": both})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", nargs="+", default=["steps"], choices=["ref500", "steps", "lbfgs", "summary"],
                   help="what to run (summary: only recompute the L-BFGS summary from --out)")
    p.add_argument("--content", default="/work/shared/data/rainier.jpg", help="content image")
    p.add_argument("--style", default="/work/shared/data/autumn-oak.jpg", help="style image")
    p.add_argument("--size", nargs=2, type=int, default=[300, 450], help="H W")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run (phase steps)")
    p.add_argument("--ref-steps", type=int, default=500, help="reference Adam steps (phase ref500)")
    p.add_argument("--lbfgs-steps", type=int, default=1000, help="max L-BFGS evaluations per scale (phase lbfgs)")
    p.add_argument("--lbfgs-repeats", type=int, default=1, help="repeats of each L-BFGS run")
    p.add_argument("--lbfgs-variants", default="both", choices=["both", "single", "coarse-to-fine"],
                   help="which L-BFGS runs: at 300x450 only, coarse-to-fine (150x225 then 300x450), or both")
    p.add_argument("--lbfgs-budget", type=float, default=0.25,
                   help="run each L-BFGS curve for this fraction of 500 reference steps' time")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported")
    p.add_argument("--quick", action="store_true", help="steps phase: skip the fp32 NCHW variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="steps phase: jobs.style variants to time against the reference (leave out bf16 where "
                   "it is emulated: ~30x slower on a CPU without native bf16)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    p.add_argument("--seed", type=int, default=0, help="seed of the random VGG weights")
    p.add_argument("--out", default="bench/results/style_bench.json", help="results JSON (merged)")
    args = p.parse_args()
    if args.phase == ["summary"]:  # no measurement: the file keeps its command, machine and CPU
        with open(args.out) as f:
            results = json.load(f)
        if "lbfgs" not in results or "ref500" not in results:
            raise SystemExit(f"{args.out} has no lbfgs and ref500 results to summarise")
        results["lbfgs_summary"] = lbfgs_summary(results)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        return
    if "summary" in args.phase:
        raise SystemExit("--phase summary runs alone (the other phases summarise as they finish)")
    torch.set_num_threads(args.threads)
    content = load_image(args.content)
    style = load_image(args.style)
    features = load_vgg("random", args.seed)
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results["command"] = " ".join(sys.argv)
    results["torch"] = torch.__version__
    results["threads"] = args.threads
    for phase in args.phase:
        if phase == "ref500":
            results["ref500"] = phase_ref500(args, content, style, features)
        elif phase == "steps":
            results["steps"] = phase_steps(args, content, style, features)
        elif phase == "lbfgs":
            if "steps" not in results:
                raise SystemExit("phase lbfgs needs the steps results in --out (its budget is set from them)")
            ref_s = results["steps"]["summary"]["reference"]["per_step_s"]
            results["lbfgs"] = phase_lbfgs(args, content, style, features, ref_s)
        if "lbfgs" in results and "ref500" in results:
            results["lbfgs_summary"] = lbfgs_summary(results)
        results["cpu"] = cpu_features()  # the figures hold for this kind of CPU (bf16 native or not)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
