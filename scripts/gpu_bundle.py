#!/usr/bin/env python3
"""The GPU bundle's packing and unpacking, with the Python standard library alone (a GPU machine
may have no `xz` or `tar` binary; it has python3).

  gpu_bundle.py pack STAGE OUT [--piece-mib 60] [--preset 6]
      STAGE's top-level folders (in the order given by --order) as one tar stream, xz-compressed,
      cut into pieces of at most --piece-mib MiB: OUT/star-gpu.tar.xz.000, .001, ...; their sha256
      in OUT/SHA256SUMS, and OUT/plan.json: which piece each device call carries, in which order,
      and the command it runs. Prints the plan.
  gpu_bundle.py receive PIECES DEST
      Checks the pieces present against SHA256SUMS (a wrong one is an error), then extracts into
      DEST every tar member that the pieces present so far hold completely (the stream is read
      from the first piece; a member cut at the end of the last piece present is left out).
      Prints which pieces are missing; exit 0. Writes DEST/.complete once everything is there.
  gpu_bundle.py plan PIECES
      Prints the plan of a packed bundle.
  gpu_bundle.py ldpath
      The nvidia/*/lib folders of this interpreter's site-packages, ':'-joined (the CUDA
      libraries of PyTorch's nvidia-* wheels).
"""
import argparse
import glob
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import tarfile

PREFIX = "star-gpu.tar.xz."
SUMS = "SHA256SUMS"
PLAN = "plan.json"
COMPLETE = ".complete"
BUNDLE_ID = ".bundle-id"
# The "data" extraction filter (no absolute paths, no device files) where this Python has it
# (3.12, and 3.11.4+ / 3.10.12+); older ones extract our own archive without it.
SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class PieceWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most `size` bytes."""

    def __init__(self, out, size):
        self.out, self.size = out, size
        self.pieces, self.f, self.left = [], None, 0

    def writable(self):
        return True

    def write(self, b):
        b = memoryview(b)
        done = 0
        while done < len(b):
            if self.left == 0:
                self._next()
            n = min(self.left, len(b) - done)
            self.f.write(b[done:done + n])
            self.left -= n
            done += n
        return done

    def _next(self):
        if self.f:
            self.f.close()
        name = os.path.join(self.out, "%s%03d" % (PREFIX, len(self.pieces)))
        self.pieces.append(name)
        self.f, self.left = open(name, "wb"), self.size

    def close(self):
        if self.f:
            self.f.close()
            self.f = None
        super().close()


class XzWriter(io.RawIOBase):
    """Compresses what is written into `sink`."""

    def __init__(self, sink, preset):
        self.sink = sink
        self.c = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=preset)

    def writable(self):
        return True

    def write(self, b):
        self.sink.write(self.c.compress(bytes(b)))
        return len(b)

    def close(self):
        if not self.closed:
            self.sink.write(self.c.flush())
        super().close()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(a):
    os.makedirs(a.out, exist_ok=True)
    for old in glob.glob(os.path.join(a.out, PREFIX + "*")):
        os.remove(old)
    order = a.order.split(",")
    missing = [d for d in order if not os.path.isdir(os.path.join(a.stage, d))]
    if missing:
        sys.exit("error: %s has no %s" % (a.stage, ", ".join(missing)))
    pieces = PieceWriter(a.out, a.piece_mib << 20)
    xz = XzWriter(pieces, a.preset)
    raw = 0
    with tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for d in order:
            for root, dirs, files in os.walk(os.path.join(a.stage, d)):
                dirs.sort()
                for f in sorted(files):
                    p = os.path.join(root, f)
                    raw += os.path.getsize(p)
                    tf.add(p, arcname=os.path.relpath(p, a.stage), recursive=False)
            print("packed %s/" % d, file=sys.stderr, flush=True)
    xz.close()
    pieces.close()
    names = [os.path.basename(p) for p in pieces.pieces]
    with open(os.path.join(a.out, SUMS), "w") as f:
        for n in names:
            f.write("%s  %s\n" % (sha256(os.path.join(a.out, n)), n))
    total = sum(os.path.getsize(os.path.join(a.out, n)) for n in names)
    plan = make_plan(a, names, raw, total)
    with open(os.path.join(a.out, PLAN), "w") as f:
        json.dump(plan, f, indent=1)
    print_plan(plan)


def make_plan(a, names, raw, total):
    rel = a.carry_dir.rstrip("/")
    calls = []
    for i, n in enumerate(names):
        # The checksums and the plan travel with every piece (1 KB): a call that finds a fresh
        # machine says so instead of failing on a missing file.
        carry = ["%s/%s" % (rel, SUMS), "%s/%s" % (rel, PLAN), "%s/%s" % (rel, n)]
        last = i == len(names) - 1
        calls.append({
            "carry": carry,
            "command": "bash scripts/gpu-check.sh run" if last else "bash scripts/gpu-check.sh receive",
            # The device tool allows 9 minutes a call here; the check stops itself at 470 s.
            "timeout_s": 530 if last else 120,
        })
    return {"pieces": names, "raw_bytes": raw, "bytes": total, "piece_bytes": a.piece_mib << 20,
            "carry_dir": rel, "calls": calls}


def print_plan(plan):
    mib = lambda b: "%.1f MiB" % (b / 2**20)
    print("GPU bundle: %s of files in %s of xz, %d piece(s) of at most %s; each device call carries "
          "one piece (64 MiB per call, the working tree included)." % (
              mib(plan["raw_bytes"]), mib(plan["bytes"]), len(plan["pieces"]), mib(plan["piece_bytes"])))
    print("Before the calls, here: mkdir -p /tmp/star-aside && mv assets tests/fixtures /tmp/star-aside/ "
          "(the tree must travel with a piece in 64 MiB; they go back after the last call).")
    for i, c in enumerate(plan["calls"]):
        print("  call %d: carry %s\n          command: %s   (timeout_s %d)" % (
            i + 1, json.dumps(c["carry"]), c["command"], c["timeout_s"]))
    print("After the calls, here: mv /tmp/star-aside/assets . && mv /tmp/star-aside/fixtures tests/ ; "
          "then give_back. On the device, `receive` checks each piece's sha256 and unpacks what is "
          "complete into %s/unpacked (python3's lzma and tarfile: no xz or tar needed); the table "
          "comes back as $OUT/table.md, row by row." % os.path.dirname(plan["carry_dir"]))


class Chain(io.RawIOBase):
    """The pieces present, in order, as one stream (it ends where the first missing one is)."""

    def __init__(self, paths):
        self.paths, self.f = list(paths), None

    def readable(self):
        return True

    def readinto(self, b):
        while True:
            if self.f is None:
                if not self.paths:
                    return 0
                self.f = open(self.paths.pop(0), "rb")
            n = self.f.readinto(b)
            if n:
                return n
            self.f.close()
            self.f = None


class Unxz(io.RawIOBase):
    """Decompresses a possibly truncated xz stream: at the end of the input it simply ends."""

    def __init__(self, raw):
        self.raw, self.d, self.buf = raw, lzma.LZMADecompressor(format=lzma.FORMAT_XZ), b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self.buf:
            if self.d.eof:
                return 0
            chunk = self.raw.read(1 << 20)
            if not chunk:
                return 0
            self.buf = self.d.decompress(chunk)
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def read_sums(pieces):
    path = os.path.join(pieces, SUMS)
    if not os.path.isfile(path):
        sys.exit("error: %s is missing: carry it with the first piece" % path)
    sums = {}
    for line in open(path):
        h, n = line.split()
        sums[n] = h
    return sums


def receive(a):
    sums = read_sums(a.pieces)
    names = sorted(sums)
    # What was unpacked belongs to this bundle, or it goes: files of an earlier bundle with the
    # same sizes would otherwise be kept as if they were this one's.
    bundle_id = sha256(os.path.join(a.pieces, SUMS))
    id_file = os.path.join(a.dest, BUNDLE_ID)
    if os.path.isdir(a.dest) and (not os.path.isfile(id_file) or open(id_file).read() != bundle_id):
        shutil.rmtree(a.dest)
    os.makedirs(a.dest, exist_ok=True)
    with open(id_file, "w") as f:
        f.write(bundle_id)
    complete = os.path.join(a.dest, COMPLETE)
    if os.path.exists(complete):
        os.remove(complete)
    present = []
    for n in names:
        p = os.path.join(a.pieces, n)
        if not os.path.isfile(p):
            break
        got = sha256(p)
        if got != sums[n]:
            sys.exit("error: %s: sha256 %s, expected %s: carry it again" % (n, got, sums[n]))
        present.append(p)
    missing = names[len(present):]
    print("pieces: %d of %d present and checked%s" % (
        len(present), len(names), "; missing: " + ", ".join(missing) if missing else ""))
    later = [n for n in missing if os.path.isfile(os.path.join(a.pieces, n))]
    if later:
        print("the pieces of earlier calls are gone (%s present, %s not): this machine was started "
              "afresh; redo the calls of the plan from call 1" % (", ".join(later), missing[0]))
    done, cut = extract(present, a.dest, complete=not missing)
    print("unpacked: %d file(s)%s" % (done, "; cut at the end of the pieces present: " + cut if cut else ""))
    if not missing:
        open(complete, "w").close()


def extract(paths, dest, complete):
    """Extracts the members the pieces hold completely; returns (count, the member cut at the
    end of the pieces present, if any). With every piece present, a short stream is an error."""
    stream = io.BufferedReader(Unxz(io.BufferedReader(Chain(paths))), 1 << 20)
    done, member = 0, None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                target = os.path.join(dest, member.name)
                if not (member.isfile() and os.path.isfile(target)
                        and os.path.getsize(target) == member.size):
                    tf.extract(member, dest, **SAFE)
                done += 1
                member = None
    except (tarfile.ReadError, EOFError):
        if complete:
            raise
        if member is None:
            return done, "(a tar header)"
        p = os.path.join(dest, member.name)
        if os.path.isfile(p):
            os.remove(p)
        return done, member.name
    return done, None


def plan_cmd(a):
    with open(os.path.join(a.pieces, PLAN)) as f:
        print_plan(json.load(f))


def ldpath(_):
    dirs = []
    for sp in sys.path:
        for lib in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))):
            if os.path.isdir(lib) and lib not in dirs:
                dirs.append(lib)
    print(":".join(dirs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("stage")
    p.add_argument("out")
    p.add_argument("--piece-mib", type=int, default=60)
    p.add_argument("--preset", type=int, default=6)
    p.add_argument("--order", default="bin,anchors,fixtures,ort")
    p.add_argument("--carry-dir", default=".gpu-bundle/pieces",
                   help="where the pieces are, relative to the repository root (what carry names)")
    p.set_defaults(f=pack)
    p = sub.add_parser("receive")
    p.add_argument("pieces")
    p.add_argument("dest")
    p.set_defaults(f=receive)
    p = sub.add_parser("plan")
    p.add_argument("pieces")
    p.set_defaults(f=plan_cmd)
    p = sub.add_parser("ldpath")
    p.set_defaults(f=ldpath)
    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
