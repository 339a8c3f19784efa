"""Write MovingDigits clips as a user would bring their own data: name.mp4 + name.txt (caption).

    python scripts/make_toy_clips.py --out data/shifted-clips --n 512 --colors magenta,cyan,white

Used to show downstream fine-tuning on a shifted domain (colours the teacher never saw); the folder
then goes through `anystep encode` like any user's clips.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anystep.data.moving_digits import MovingDigits, WorldConfig  # noqa: E402
from anystep.io import write_mp4  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--colors", default="red,green,blue,yellow")
    ap.add_argument("--directions", default="left,right,up,down")
    ap.add_argument("--num-frames", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    world = WorldConfig(num_frames=args.num_frames, colors=tuple(args.colors.split(",")),
                        directions=tuple(args.directions.split(",")))
    ds = MovingDigits("train", world, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        c = ds[i]
        write_mp4(c.video, out / f"clip{i:05d}.mp4", scale=1)
        (out / f"clip{i:05d}.txt").write_text(c.prompt + "\n")
    print(f"wrote {args.n} clips to {out}")


if __name__ == "__main__":
    main()
