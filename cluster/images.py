"""Image digests for the cluster files: check them, print one, or render a file with them.

Every image in cluster/ is written as `<repository>:<tag>@images.lock:<name>` (or, in the
Dockerfile, `<repository>:<tag>@${<NAME>_DIGEST}` from a build argument). cluster/images.lock
holds the digest of each <name>; this script is the only thing that puts it in place, and it
refuses an entry whose digest is missing or malformed instead of falling back to the tag.

    python cluster/images.py check            # exit 1 unless every image is pinned by a filled digest
    python cluster/images.py digest ray-gpu   # print one digest (for docker build --build-arg)
    python cluster/images.py render FILE      # FILE with each lock reference replaced by image@digest

Standard library and PyYAML only (Ray depends on PyYAML, so any machine that runs `ray up` has it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent
LOCK = CLUSTER / "images.lock"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
LOCK_REF = re.compile(r"images\.lock:([a-z0-9][a-z0-9-]*)")
BUILD_ARG_REF = re.compile(r"\$\{?([A-Z][A-Z0-9_]*_DIGEST)\}?")
# `<repository>:<tag>@images.lock:<name>` inside a file's text (rendering keeps everything else).
TEXT_LOCK_REF = re.compile(r"(?P<ref>[A-Za-z0-9][\w./:-]*)@images\.lock:(?P<name>[a-z0-9][a-z0-9-]*)")
IMAGE_KEYS = ("image", "head_image", "worker_image")
FILL_HINT = ("fill it with `docker buildx imagetools inspect <image>` or `crane digest <image>` "
             "(see cluster/images.lock)")


def load_lock(path: Path | str = LOCK) -> dict[str, dict[str, str]]:
    """The lock's entries, each {"image": repository:tag, "digest": str}; a malformed file raises."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of entries")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{path}: entry {name!r} needs `image: <repository>:<tag>`")
        digest = entry.get("digest")
        out[str(name)] = {"image": entry["image"], "digest": "" if digest is None else str(digest)}
    return out


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, pin) of `repository[:tag][@pin]`; a registry port is not a tag."""
    name, _, pin = ref.partition("@")
    repo, tag = name, None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
    return repo, tag, (pin or None)


def _basename(repo: str) -> str:
    return repo.rsplit("/", 1)[-1]


def lock_problems(lock: dict[str, dict[str, str]], names=None) -> list[str]:
    """Why entries (all, or `names`) cannot pin anything: no digest, a malformed one, no tag."""
    problems = []
    for name in sorted(lock if names is None else names):
        if name not in lock:
            problems.append(f"images.lock has no entry {name!r}")
            continue
        entry = lock[name]
        repo, tag, pin = split_ref(entry["image"])
        if tag is None or pin is not None:
            problems.append(f"images.lock {name}: image {entry['image']!r} must be <repository>:<tag>")
        if not entry["digest"]:
            problems.append(f"images.lock {name}: no digest for {entry['image']}: {FILL_HINT}")
        elif not DIGEST.fullmatch(entry["digest"]):
            problems.append(f"images.lock {name}: digest {entry['digest']!r} is not sha256:<64 lowercase hex>")
    return problems


def reference_problems(ref: str, lock: dict[str, dict[str, str]], build_args: set[str] = frozenset()) -> list[str]:
    """Why `ref` (an image as written in a cluster file) is not pinned: it must carry a tag and
    either a literal sha256 digest or a reference to a lock entry of the same name and tag (in
    the Dockerfile also a declared build argument <ENTRY>_DIGEST)."""
    repo, tag, pin = split_ref(ref)
    if tag is None:
        return [f"{ref}: no tag (write <repository>:<tag>@..., the tag keeps the version readable)"]
    if pin is None:
        return [f"{ref}: pinned by tag only: add @images.lock:<entry> (see cluster/images.lock)"]
    if DIGEST.fullmatch(pin):
        return []
    m = LOCK_REF.fullmatch(pin) or BUILD_ARG_REF.fullmatch(pin)
    if m is None:
        return [f"{ref}: {pin!r} is neither sha256:<64 hex> nor images.lock:<entry>"]
    if m.re is BUILD_ARG_REF:
        if m.group(1) not in build_args:
            return [f"{ref}: build argument {m.group(1)} is not declared (ARG, no default) before FROM"]
        name = m.group(1)[: -len("_DIGEST")].lower().replace("_", "-")
    else:
        name = m.group(1)
    if name not in lock:
        return [f"{ref}: images.lock has no entry {name!r}"]
    lrepo, ltag, _ = split_ref(lock[name]["image"])
    if ltag != tag or _basename(lrepo) != _basename(repo):
        return [f"{ref}: images.lock {name} is {lock[name]['image']}, not the same image and tag"]
    return []


def dockerfile_images(text: str) -> tuple[list[str], set[str]]:
    """(FROM references, build arguments declared without a default before the first FROM)."""
    refs, args, seen_from = [], set(), False
    for line in text.splitlines():
        if m := re.match(r"\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)\s*$", line):
            if not seen_from:
                args.add(m.group(1))
        elif m := re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", line, flags=re.I):
            seen_from = True
            refs.append(m.group(1))
    return refs, args


def yaml_images(doc, where: str = "") -> list[tuple[str, str]]:
    """(path, value) of every image-valued key anywhere in a parsed YAML document."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in IMAGE_KEYS and isinstance(v, str):
                out.append((f"{where}.{k}".lstrip("."), v))
            else:
                out += yaml_images(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += yaml_images(v, f"{where}[{i}]")
    return out


def cluster_files(root: Path = CLUSTER) -> list[Path]:
    return sorted(root.rglob("*.yaml")) + [root / "Dockerfile"]


def file_problems(path: Path, lock: dict[str, dict[str, str]]) -> list[str]:
    """Every image in one cluster file that is not pinned by digest or by a lock reference."""
    import yaml

    text = Path(path).read_text()
    if Path(path).name == "Dockerfile":
        refs, args = dockerfile_images(text)
        return [f"{path.name} FROM {p}" for r in refs for p in reference_problems(r, lock, args)]
    problems = []
    for i, doc in enumerate(yaml.safe_load_all(text)):
        for where, ref in yaml_images(doc):
            problems += [f"{path.name}#{i} {where}: {p}" for p in reference_problems(ref, lock)]
    return problems


def render(text: str, lock: dict[str, dict[str, str]]) -> str:
    """`text` with each `<repository>:<tag>@images.lock:<name>` replaced by the lock's
    `<repository>:<tag>@sha256:<digest>` (the lock's repository, so a registry prefix set there
    applies). Raises ValueError, naming them, if a referenced entry cannot pin."""
    used = {m.group("name") for m in TEXT_LOCK_REF.finditer(text)}
    problems = lock_problems(lock, used)
    for m in TEXT_LOCK_REF.finditer(text):
        if m.group("name") in lock:
            problems += reference_problems(f"{m.group('ref')}@images.lock:{m.group('name')}", lock)
    if problems:
        raise ValueError("refusing to render:\n  " + "\n  ".join(dict.fromkeys(problems)))

    def pinned(m: re.Match) -> str:
        entry = lock[m.group("name")]
        return f"{entry['image']}@{entry['digest']}"

    out = TEXT_LOCK_REF.sub(pinned, text)
    assert "@images.lock:" not in out
    return out


def main(argv: list[str]) -> int:
    usage = "usage: images.py check | digest NAME | render FILE   (optional: --lock PATH first)"
    lock_path = LOCK
    if argv[:1] == ["--lock"] and len(argv) >= 2:
        lock_path, argv = Path(argv[1]), argv[2:]
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    lock = load_lock(lock_path)
    cmd, rest = argv[0], argv[1:]
    if cmd == "check" and not rest:
        problems = lock_problems(lock)
        for f in cluster_files():
            problems += file_problems(f, lock)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"every image in {CLUSTER.name}/ is pinned by a digest in {lock_path.name}")
        return 1 if problems else 0
    if cmd == "digest" and len(rest) == 1:
        problems = lock_problems(lock, [rest[0]])
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(lock[rest[0]]["digest"])
        return 0
    if cmd == "render" and len(rest) == 1:
        try:
            sys.stdout.write(render(Path(rest[0]).read_text(), lock))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
