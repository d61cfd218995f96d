"""`pocketdiff profile`: a thin layer over `runtimes.profiler.profile_folder`, with its table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..commands import Handler, command, emit, int_range, path_arg


def _csv(value: str) -> list[str]:
    """argparse type: a comma-separated list of at least one name."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


@command("profile", "latency per component and per image, peak memory, operators, MACs and bytes of exported "
                    "artifacts, and phone estimates")
def _profile(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("artifacts", type=path_arg, help="a folder written by `pocketdiff export`")
    p.add_argument("--against", type=path_arg, default=None,
                   help="a second export with the same targets and components, timed side by side; prints the ratios")
    p.add_argument("--targets", type=_csv, default=None, help="only these targets (default: all in the folder)")
    p.add_argument("--devices", type=_csv, default=None,
                   help="phone profiles to estimate for (default: all in runtimes/devices.json)")
    p.add_argument("--blocks", type=int_range(1, 1000), default=4, help="rotating timing blocks")
    p.add_argument("--per-block", type=int_range(1, 1000), default=2, help="timed calls per runner per block")
    p.add_argument("--report", type=path_arg, default=None,
                   help="JSON report to write (default: ARTIFACTS.profile.json beside the folder)")

    def run(args: argparse.Namespace) -> None:
        from ..fileio import atomic_write_json, prepare_output_file
        from .estimates import get_devices
        from .profiler import ProfileConfig, profile_folder

        get_devices(args.devices)  # an unknown device fails before anything runs
        report = prepare_output_file(args.report or Path(f"{Path(args.artifacts).resolve()}.profile.json"), "--report")
        result = profile_folder(args.artifacts, args.against,
                                ProfileConfig(blocks=args.blocks, per_block=args.per_block, targets=args.targets,
                                              devices=args.devices))
        atomic_write_json(report, result)
        result["report"] = str(report)
        emit(args, result, "\n".join(table(result) + [f"report: {report}"]))
    return run


def table(result: dict[str, Any]) -> list[str]:
    """The profile as text lines: per target and component, per image, memory, top operators, estimates."""
    host = result["host"]
    lines = [f"host: {host['cpu']}, {host['cores']} cores, load {host['load_average'][0]:.2f}; "
             f"{result['method']['blocks']} blocks x {result['method']['per_block']} timed calls per runner"]
    for target, peak in result.get("host_matmul_peak", {}).items():
        libs = ", ".join(f"{k} {v:.1f}" for k, v in peak["by_library_gmacs_per_s"].items())
        lines.append(f"{target} run: host dense fp32 matmul peak {peak['gmacs_per_s']:.1f} GMAC/s "
                     f"({peak['side']}^3 in the same blocks; {libs})")
    for label, prof in result["profiles"].items():
        lines.append(f"\n{'ARTIFACTS' if label == 'A' else 'OTHER'} {prof['folder']} ({prof['model']})")
        for target, t in prof["targets"].items():
            if t.get("status") != "measured":
                lines.append(f"  {target}: {t['status']}")
                continue
            lines.append(f"  {target:<11}{'component':<14}{'batch':>5}{'median ms':>11}{'p90 ms':>9}{'GMACs':>9}"
                         f"{'MB moved':>10}{'GMAC/s':>9}{'of peak':>9}")
            for comp, c in t["components"].items():
                macs = f"{c['macs'] / 1e9:>9.3f}" if "macs" in c else f"{'-':>9}"
                moved = f"{c['bytes_min'] / 1e6:>10.1f}" if "bytes_min" in c else f"{'-':>10}"
                rate = (f"{c['achieved_gmacs_per_s']:>9.1f}{100 * c['share_of_host_peak']:>8.1f}%"
                        if "achieved_gmacs_per_s" in c else f"{'-':>9}{'-':>9}")
                lines.append(f"  {'':<11}{comp:<14}{c['batch']:>5}{c['median_ms']:>11.2f}{c['p90_ms']:>9.2f}"
                             f"{macs}{moved}{rate}")
            if t["image"]:
                im, s = t["image"], t["image"]["sampler"]
                share = ", ".join(f"{c} {100 * v:.0f} %" for c, v in im["share"].items())
                lines.append(f"  {'':<11}{'image':<14}{'':>5}{im['median_ms']:>11.2f}{im['p90_ms']:>9.2f}  "
                             f"{s['scheduler']} x{s['steps']} g={s['guidance_scale']}; {share}")
            m = t["memory"]
            lines.append(f"  {'':<11}peak RSS {m['peak_rss_mb']:.0f} MB (after imports {m['rss_after_imports_mb']:.0f}, "
                         f"artifacts loaded {m['rss_after_load_mb']:.0f})")
            for comp, ops in t["operators"].items():
                if "error" in ops:
                    lines.append(f"  {'':<11}operators {comp}: not available ({ops['error']})")
                    continue
                top = ", ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in ops["ops"][:4])
                lines.append(f"  {'':<11}operators {comp} ({ops['call_ms']:.2f} ms/call): {top}")
        for e in prof.get("estimates", []):
            err = f"+/-{e['calibration_error_pct']:.0f} % (leave-one-out)" if e["calibration_error_pct"] is not None \
                else f"no held-out check ({e['calibration_points']} calibration point)"
            fit = "fits" if e["memory"]["fits"] else "does NOT fit"
            lines.append(f"  ESTIMATE {e['device']:<18} {e['image_ms']:>9.1f} ms/image, calibration error {err}; "
                         f"memory {e['memory']['needed_mb']:.0f} MB {fit} in {e['memory']['budget_mb']:.0f} MB")
    cal = result["estimates"]["calibration"]
    lines.append("\nestimate calibration (published figures predicted, leave-one-out per accelerator kind):")
    for pt in cal["points"]:
        pred = f"{pt['predicted_ms']:.1f} ms ({pt['error_pct']:+.1f} %)" if pt["predicted_ms"] else "n/a (only point)"
        lines.append(f"  {pt['id']:<18} published {pt['measured_ms']:.1f} ms, predicted {pred}")
    if "against" in result:
        lines.append(f"\nratio ({result['against']['ratio']}):")
        for target, row in result["against"]["targets"].items():
            lines.append(f"  {target:<11}" + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return lines
