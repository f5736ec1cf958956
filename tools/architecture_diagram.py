"""Draws docs/architecture.svg, the README's picture of one Sluice job.

    uv run python -m tools.architecture_diagram     # rewrites docs/architecture.svg

The picture is plain SVG written from the boxes and arrows below, so it needs no drawing
package and diffs like text; tests/test_docs.py checks that the committed file is this
script's output, so the picture cannot drift from its source.
"""

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "architecture.svg"
WIDTH, HEIGHT = 960, 470
FONT = "font-family='Helvetica, Arial, sans-serif'"


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int
    title: str
    lines: tuple[str, ...] = ()
    fill: str = "#ffffff"
    dashed: bool = False

    @property
    def left(self) -> tuple[int, int]:
        return self.x, self.y + self.h // 2

    @property
    def right(self) -> tuple[int, int]:
        return self.x + self.w, self.y + self.h // 2

    @property
    def top(self) -> tuple[int, int]:
        return self.x + self.w // 2, self.y

    @property
    def bottom(self) -> tuple[int, int]:
        return self.x + self.w // 2, self.y + self.h


# Ray's own objects (the placement group, the object store) are dashed; Sluice's are solid.
PLACEMENT = Box(20, 150, 920, 220, "", fill="#f6f8fa", dashed=True)
PLACEMENT_TITLE = "Ray placement groups (GPU bundles)"  # centred, between the driver's arrows
DRIVER = Box(
    330,
    20,
    300,
    92,
    "Driver (actors/loop.py)",
    (
        "config, slime flags, placement plan",
        "step: rollout -> train -> weight sync",
        "evaluation, checkpoints, restarts",
    ),
    fill="#fff4e0",
)
TRAINERS = Box(
    40,
    200,
    330,
    145,
    "TrainActors: one per training rank",
    (
        "backend: megatron-core (TP, SP, PP, CP, EP,",
        "  distributed optimizer, CPU Adam) or torch DDP",
        "torch.distributed: NCCL (gloo on CPUs)",
        "log-probs, GRPO / GSPO loss, routing replay",
        "bf16 weights, torch_dist checkpoints",
    ),
    fill="#e8f1fb",
)
ENGINES = Box(
    590,
    200,
    330,
    145,
    "RolloutActors: one per engine",
    (
        "SGLang servers (EP, DP attention, fp8)",
        "  or in-process transformers",
        "samples, log-probs, routed experts",
        "rewards and group advantages",
        "weight version stamped on every row",
    ),
    fill="#eaf6ec",
)
STORE = Box(
    380,
    395,
    200,
    60,
    "Ray object store",
    ("Arrow record batches",),
    fill="#f6f8fa",
    dashed=True,
)
TRACKING = Box(
    700,
    20,
    240,
    92,
    "Tracking",
    ("TensorBoard, W&B, MLflow", "Ray dashboard metrics", "summary.json"),
    fill="#f3ecfa",
)
PROMPTS = Box(20, 20, 220, 92, "Prompts", ("jsonl / parquet, chat", "named eval sets"))

BOXES = (PLACEMENT, DRIVER, TRAINERS, ENGINES, STORE, TRACKING, PROMPTS)


@dataclass(frozen=True)
class Arrow:
    start: tuple[int, int]
    end: tuple[int, int]
    label: str
    label_at: tuple[int, int]
    color: str = "#444444"
    bold: bool = False


def _shift(point: tuple[int, int], dx: int = 0, dy: int = 0) -> tuple[int, int]:
    return point[0] + dx, point[1] + dy


ARROWS = (
    Arrow(PROMPTS.right, DRIVER.left, "prompts", (258, 58)),
    Arrow(DRIVER.right, TRACKING.left, "metrics", (640, 58)),
    Arrow(
        _shift(DRIVER.bottom, dx=60),
        _shift(ENGINES.top, dx=-60),
        "generate(prompt groups, version)",
        (600, 140),
    ),
    Arrow(
        _shift(DRIVER.bottom, dx=-60),
        _shift(TRAINERS.top, dx=60),
        "train(batch refs balanced by tokens)",
        (140, 140),
    ),
    Arrow(
        _shift(ENGINES.bottom, dx=-80),
        STORE.right,
        "ray.put: rollout rows",
        (640, 420),
    ),
    Arrow(
        STORE.left,
        _shift(TRAINERS.bottom, dx=80),
        "zero-copy ray.get",
        (220, 430),
    ),
    Arrow(
        _shift(TRAINERS.right, dy=-30),
        _shift(ENGINES.left, dy=-30),
        "weights after every step",
        (395, 232),
        color="#b03a2e",
        bold=True,
    ),
)
WEIGHT_NOTE = ("NCCL broadcast in buckets,", "or CUDA IPC when colocated", "(checked, versioned)")


def _box_svg(box: Box) -> list[str]:
    dash = " stroke-dasharray='6 4'" if box.dashed else ""
    parts = [
        f"<rect x='{box.x}' y='{box.y}' width='{box.w}' height='{box.h}' rx='8' "
        f"fill='{box.fill}' stroke='#555555'{dash}/>",
        f"<text x='{box.x + 12}' y='{box.y + 22}' {FONT} font-size='15' font-weight='bold'>"
        f"{escape(box.title)}</text>",
    ]
    for row, line in enumerate(box.lines):
        parts.append(
            f"<text x='{box.x + 12}' y='{box.y + 44 + 19 * row}' {FONT} font-size='13'>"
            f"{escape(line)}</text>"
        )
    return parts


def _arrow_svg(arrow: Arrow) -> list[str]:
    (x1, y1), (x2, y2) = arrow.start, arrow.end
    width = 3 if arrow.bold else 1.6
    marker = "weight" if arrow.bold else "plain"
    return [
        f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='{arrow.color}' "
        f"stroke-width='{width}' marker-end='url(#{marker})'/>",
        f"<text x='{arrow.label_at[0]}' y='{arrow.label_at[1]}' {FONT} font-size='12' "
        f"fill='{arrow.color}'>{escape(arrow.label)}</text>",
    ]


def render() -> str:
    """The whole SVG document."""
    head = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}'>",
        "<title>Sluice: one job</title>",
        "<defs>",
        "<marker id='plain' markerWidth='10' markerHeight='8' refX='9' refY='4' "
        "orient='auto' markerUnits='userSpaceOnUse'><path d='M0,0 L10,4 L0,8 z' fill='#444444'/>"
        "</marker>",
        "<marker id='weight' markerWidth='14' markerHeight='10' refX='13' refY='5' "
        "orient='auto' markerUnits='userSpaceOnUse'><path d='M0,0 L14,5 L0,10 z' "
        "fill='#b03a2e'/></marker>",
        "</defs>",
        f"<rect width='{WIDTH}' height='{HEIGHT}' fill='#ffffff'/>",
    ]
    body = [part for box in BOXES for part in _box_svg(box)]
    body.append(
        f"<text x='480' y='{PLACEMENT.y + 22}' text-anchor='middle' {FONT} font-size='14' "
        f"font-weight='bold'>{escape(PLACEMENT_TITLE)}</text>"
    )
    body += [part for arrow in ARROWS for part in _arrow_svg(arrow)]
    body += [
        f"<text x='395' y='{268 + 18 * row}' {FONT} font-size='12' fill='#b03a2e'>"
        f"{escape(line)}</text>"
        for row, line in enumerate(WEIGHT_NOTE)
    ]
    return "\n".join([*head, *body, "</svg>", ""])


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
