"""Write examples/: one small order process as BPMN XML, as an SVG swimlane diagram, and as the PNG and 2-page PDF
drawn from that SVG, so the README's commands have files to send.

    python -m tools.make_examples [FOLDER]

The .bpmn is the ground truth of the pictures (``python -m tools.eval examples`` scores a model against it).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from xml.sax.saxutils import escape

LANES = ["Менеджер", "Склад", "Бухгалтер"]
TASKS = [("t1", "Принять заказ", 0), ("t2", "Проверить наличие", 1), ("t3", "Выставить счёт", 2),
         ("t4", "Отгрузить товар", 1)]
NAME = "order-process"
LANE_H, LANE_LABEL_W, TASK_W, TASK_H, GAP = 120, 120, 170, 60, 40
WIDTH = LANE_LABEL_W + GAP + len(TASKS) * (TASK_W + GAP)
HEIGHT = LANE_H * len(LANES)


def bpmn() -> str:
    refs = {lane: "".join(f"<bpmn:flowNodeRef>{task_id}</bpmn:flowNodeRef>" for task_id, _, where in TASKS
                          if where == number) for number, lane in enumerate(LANES)}
    lanes = "\n".join(f'      <bpmn:lane id="lane{number}" name="{escape(lane)}">{refs[lane]}</bpmn:lane>'
                      for number, lane in enumerate(LANES))
    tasks = "\n".join(f'    <bpmn:task id="{task_id}" name="{escape(name)}"/>' for task_id, name, _ in TASKS)
    chain = ["start"] + [task_id for task_id, _, _ in TASKS] + ["end"]
    flows = "\n".join(f'    <bpmn:sequenceFlow id="f{number}" sourceRef="{source}" targetRef="{target}"/>'
                      for number, (source, target) in enumerate(zip(chain, chain[1:])))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="order" targetNamespace="examples">
  <bpmn:collaboration id="c"><bpmn:participant id="pool" name="Заказ" processRef="order-process"/></bpmn:collaboration>
  <bpmn:process id="order-process" name="Заказ">
    <bpmn:laneSet id="lanes">
{lanes}
    </bpmn:laneSet>
    <bpmn:startEvent id="start"/>
{tasks}
    <bpmn:endEvent id="end"/>
{flows}
  </bpmn:process>
</bpmn:definitions>
"""


def svg() -> str:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="15">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             '<defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="9" refY="5" orient="auto">'
             '<path d="M0,0 L10,5 L0,10 z" fill="black"/></marker></defs>']
    for number, lane in enumerate(LANES):
        top = number * LANE_H
        parts.append(f'<rect x="1" y="{top + 1}" width="{WIDTH - 2}" height="{LANE_H - 2}" fill="none" '
                     'stroke="black" stroke-width="2"/>')
        parts.append(f'<line x1="{LANE_LABEL_W}" y1="{top}" x2="{LANE_LABEL_W}" y2="{top + LANE_H}" stroke="black"/>')
        parts.append(f'<text x="{LANE_LABEL_W / 2}" y="{top + LANE_H / 2 + 5}" text-anchor="middle" '
                     f'font-weight="bold">{escape(lane)}</text>')
    centres = []
    for column, (_, name, lane) in enumerate(TASKS):
        x = LANE_LABEL_W + GAP + column * (TASK_W + GAP)
        y = lane * LANE_H + (LANE_H - TASK_H) / 2
        centres.append((x, y))
        parts.append(f'<rect x="{x}" y="{y}" width="{TASK_W}" height="{TASK_H}" rx="10" fill="#eef4ff" '
                     'stroke="#1f4e9c" stroke-width="2"/>')
        parts.append(f'<text x="{x + TASK_W / 2}" y="{y + TASK_H / 2 + 5}" text-anchor="middle">{escape(name)}</text>')
    for (x1, y1), (x2, y2) in zip(centres, centres[1:]):
        parts.append(f'<path d="M{x1 + TASK_W},{y1 + TASK_H / 2} L{x2},{y2 + TASK_H / 2}" fill="none" '
                     'stroke="black" stroke-width="2" marker-end="url(#arrow)"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def pictures(svg_text: str) -> tuple[bytes, bytes]:
    """The PNG and a 2-page PDF (the diagram twice), drawn from the SVG by the service's own renderer."""

    from app.pipeline import svg as svg_module

    document = svg_module.parse_svg(svg_text.encode(), max_pixels=10_000_000)
    image = svg_module.rasterise(document, (WIDTH, HEIGHT)).convert("RGB")
    png, pdf = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG", optimize=True)
    image.save(pdf, format="PDF", save_all=True, append_images=[image.copy()], resolution=96)
    return png.getvalue(), pdf.getvalue()


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    svg_text = svg()
    png, pdf = pictures(svg_text)
    files = {f"{NAME}.bpmn": bpmn().encode(), f"{NAME}.svg": svg_text.encode(), f"{NAME}.png": png,
             f"{NAME}.pdf": pdf}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "examples")):
        print(path)
