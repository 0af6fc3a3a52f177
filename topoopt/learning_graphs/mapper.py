"""Learning graphs: Mapper graphs of weight trajectories (Gabella et al., arXiv 1902.08160).

A layer's trajectory (every recorded neuron at every snapshot, a point in R^fan-in) is covered by
overlapping intervals of a lens ("filter"), each interval's points are clustered with DBSCAN, and
clusters sharing points are joined. Built on gudhi's `cover_complex.MapperComplex`.

Overlap: the paper's code used KeplerMapper < 1.2 with ``perc_overlap=0.99``, where a cube of
base width w was widened to w·(1 + 0.99). gudhi's ``gains`` g widens each base interval w to
w / (1 − g), so the same cover has g = 0.99 / 1.99 ≈ 0.4975 (w/(1−g) = 1.99·w); KeplerMapper
≥ 1.2 calls that same fraction ``perc_overlap``. `tests/test_learning_graphs.py` checks the
interval lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import networkx as nx
import numpy as np
from sklearn.cluster import DBSCAN
from sklearn.decomposition import PCA

from topoopt._validation import check_choice
from topoopt.plotting import new_figure

__all__ = ["LENSES", "MapperSettings", "LearningGraph", "lens_values", "learning_graph", "pca_reduce", "PAPER_SETTINGS",
           "KMAPPER_OLD_OVERLAP_AS_GAIN"]

LENSES = ("pca_norm", "norm", "pca3")
KMAPPER_OLD_OVERLAP_AS_GAIN = 0.99 / 1.99


@dataclass(frozen=True)
class MapperSettings:
    """``lens``: "pca_norm" (L2 norm after a PCA to `pca_dims`, i.e. distance from the cloud's
    mean, as the authors' code), "norm" (L2 norm from the origin) or "pca3" (the first three
    principal coordinates, `intervals` per axis). DBSCAN runs on the PCA-reduced points."""

    lens: Literal["pca_norm", "norm", "pca3"] = "pca_norm"
    intervals: int = 30
    gain: float = KMAPPER_OLD_OVERLAP_AS_GAIN
    eps: float = 0.1
    min_samples: int = 2
    pca_dims: int = 20


# The authors' per-layer settings: first hidden, second hidden, output layer.
PAPER_SETTINGS = {
    "first": MapperSettings(intervals=30, eps=0.1),
    "second": MapperSettings(intervals=25, eps=0.2),
    "output": MapperSettings(intervals=20, eps=0.5),
    "surface": MapperSettings(lens="pca3", intervals=20, eps=0.1),
}


def pca_reduce(points: np.ndarray, dims: int) -> np.ndarray:
    """The points' first `dims` principal coordinates (fewer when the cloud has fewer), seeded."""
    dims = min(dims, points.shape[0], points.shape[1])
    return PCA(n_components=dims, random_state=0).fit_transform(points.astype(np.float64))


def lens_values(points: np.ndarray, settings: MapperSettings) -> tuple[np.ndarray, np.ndarray]:
    """(lens values n × k, the points DBSCAN clusters) for `settings`."""
    check_choice("lens", settings.lens, LENSES)
    reduced = pca_reduce(points, settings.pca_dims)
    if settings.lens == "pca_norm":
        return np.linalg.norm(reduced, axis=1, keepdims=True), reduced
    if settings.lens == "norm":
        return np.linalg.norm(points, axis=1, keepdims=True), reduced
    return reduced[:, :3], reduced


@dataclass
class LearningGraph:
    """The Mapper graph of a trajectory. Nodes carry: members (point indices), size, mean_step,
    patch (the cover element: interval index per lens axis) and neurons (sorted neuron ids)."""

    graph: nx.Graph
    settings: MapperSettings
    point_steps: np.ndarray
    point_neurons: np.ndarray
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def layout(self, kind: str) -> dict:
        """Node positions, "spring" (seed 0) or "kamada_kawai", computed once per graph: the PNG
        and the HTML of a big graph share its spring layout, most of a live build's time (a
        1,500-node graph: 3–5 s each, against 1.6 s for its Mapper)."""
        if kind not in self._layouts:
            if not self.graph.number_of_nodes():
                self._layouts[kind] = {}
            elif kind == "spring":
                self._layouts[kind] = nx.spring_layout(self.graph, seed=0)
            else:
                self._layouts[kind] = nx.kamada_kawai_layout(self.graph)
        return self._layouts[kind]

    def to_json(self) -> dict:
        return {
            "settings": self.settings.__dict__,
            "nodes": [{"id": int(n), "size": d["size"], "mean_step": d["mean_step"], "patch": list(d["patch"]),
                       "neurons": d["neurons"]} for n, d in self.graph.nodes(data=True)],
            "edges": [[int(a), int(b)] for a, b in self.graph.edges()],
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    def node_colours(self) -> dict[int, str]:
        """Each node's colour: its mean training step on matplotlib's viridis, the PNG's and the
        HTML's alike."""
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        steps = {n: d["mean_step"] for n, d in self.graph.nodes(data=True)}
        low, high = (min(steps.values()), max(steps.values())) if steps else (0.0, 1.0)
        viridis = colormaps["viridis"]
        return {n: to_hex(viridis((step - low) / ((high - low) or 1.0))) for n, step in steps.items()}

    def save_png(self, path: str | Path, title: str = "", labels: dict[int, str] | None = None) -> None:
        """Nodes sized by cluster size, coloured by mean training step; optional node labels (an
        output layer's leaves: `leaf_labels`)."""
        figure = new_figure(figsize=(8, 7))
        axes = figure.subplots()
        if self.graph.number_of_nodes():
            # Kamada–Kawai draws trees most legibly but costs O(n²) memory and time per iteration.
            positions = self.layout("kamada_kawai" if self.graph.number_of_nodes() <= 300 else "spring")
            sizes = np.array([d["size"] for _, d in self.graph.nodes(data=True)], dtype=float)
            colours = [d["mean_step"] for _, d in self.graph.nodes(data=True)]
            nx.draw_networkx_edges(self.graph, positions, ax=axes, width=0.6, alpha=0.6)
            drawn = nx.draw_networkx_nodes(self.graph, positions, ax=axes, node_size=10 + 120 * sizes / sizes.max(),
                                           node_color=colours, cmap="viridis")
            figure.colorbar(drawn, ax=axes, label="mean training step")
            if labels:
                nx.draw_networkx_labels(self.graph, positions, labels=labels, ax=axes, font_size=9, font_color="red")
        axes.set_title(title or f"learning graph ({self.settings.lens}, {self.graph.number_of_nodes()} nodes)")
        axes.axis("off")
        figure.tight_layout()
        figure.savefig(path, dpi=110)

    def save_html(self, path: str | Path, title: str = "learning graph", labels: dict[int, str] | None = None) -> None:
        """A self-contained interactive view (drag, zoom, hover for node details; no network), in
        the PNG's colours, with a colour legend of training steps and the optional node labels."""
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        positions = self.layout("spring")
        colours = self.node_colours()
        steps = [d["mean_step"] for _, d in self.graph.nodes(data=True)] or [0.0]
        data = {
            "nodes": [{"id": int(n), "x": float(positions[n][0]), "y": float(positions[n][1]), "size": d["size"],
                       "step": d["mean_step"], "colour": colours[n], "neurons": d["neurons"][:20],
                       "label": (labels or {}).get(n, "")} for n, d in self.graph.nodes(data=True)],
            "edges": [[int(a), int(b)] for a, b in self.graph.edges()],
            "legend": {"low": min(steps), "high": max(steps),
                       "stops": [to_hex(colormaps["viridis"](i / 8)) for i in range(9)]},
        }
        Path(path).write_text(_HTML.replace("__TITLE__", title).replace("__DATA__", json.dumps(data)))


def learning_graph(points: np.ndarray, point_steps: np.ndarray, point_neurons: np.ndarray,
                   settings: MapperSettings = MapperSettings()) -> LearningGraph:
    """The Mapper graph of a trajectory's points (rows), coloured by training step."""
    import time

    from gudhi.cover_complex import MapperComplex

    started = time.perf_counter()
    lens, reduced = lens_values(points, settings)
    k = lens.shape[1]
    # min_points_per_node = min_samples: gudhi turns a cover element holding a single point into a
    # node, where DBSCAN (and KeplerMapper) would call that point noise.
    mapper = MapperComplex(input_type="point cloud", resolutions=[settings.intervals] * k, gains=[settings.gain] * k,
                           min_points_per_node=settings.min_samples,
                           clustering=DBSCAN(eps=settings.eps, min_samples=settings.min_samples),
                           filter_bnds=np.column_stack([lens.min(axis=0), lens.max(axis=0)]))
    mapper.fit(reduced, filters=lens, colors=point_steps.reshape(-1, 1).astype(float))
    graph = nx.Graph()
    inserted = {simplex[0] for simplex, _ in mapper.simplex_tree_.get_skeleton(0)}
    for node in inserted:
        info = mapper.node_info_[node]
        members = np.asarray(info["indices"])
        graph.add_node(int(node), size=int(len(members)), mean_step=float(point_steps[members].mean()),
                       patch=tuple(int(p) for p in info["patch"]), members=members,
                       neurons=sorted(int(n) for n in np.unique(point_neurons[members])))
    for simplex, _ in mapper.simplex_tree_.get_skeleton(1):
        if len(simplex) == 2:
            graph.add_edge(int(simplex[0]), int(simplex[1]))
    return LearningGraph(graph, settings, point_steps, point_neurons, seconds=time.perf_counter() - started)


_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>body{font:13px sans-serif;margin:0}#info{position:absolute;top:8px;left:8px;background:#fffc;padding:6px}
#legend{position:absolute;bottom:12px;left:12px;background:#fffc;padding:6px}
#bar{width:220px;height:12px;margin:4px 0}</style>
</head><body><div id="info">__TITLE__ — drag to pan, wheel to zoom, hover a node</div>
<div id="legend">colour: mean training step<div id="bar"></div><span id="lo"></span>
<span id="hi" style="float:right"></span></div><canvas id="c"></canvas><script>
const data=__DATA__;const c=document.getElementById('c'),g=c.getContext('2d');c.width=innerWidth;c.height=innerHeight;
let s=Math.min(c.width,c.height)*0.42,ox=c.width/2,oy=c.height/2,drag=null;
const mx=Math.max(...data.nodes.map(n=>n.size));const by={};data.nodes.forEach(n=>by[n.id]=n);
document.getElementById('bar').style.background=`linear-gradient(to right,${data.legend.stops.join(',')})`;
document.getElementById('lo').textContent=data.legend.low.toFixed(0);
document.getElementById('hi').textContent=data.legend.high.toFixed(0);
function P(n){return [ox+n.x*s,oy+n.y*s]}
function draw(){g.clearRect(0,0,c.width,c.height);g.strokeStyle='#999';\
data.edges.forEach(([a,b])=>{const p=P(by[a]),q=P(by[b]);g.beginPath();g.moveTo(...p);g.lineTo(...q);g.stroke()});
data.nodes.forEach(n=>{const p=P(n),r=2+8*Math.sqrt(n.size/mx);g.fillStyle=n.colour;g.beginPath();\
g.arc(p[0],p[1],r,0,7);g.fill();if(n.label){g.fillStyle='#c00';g.font='bold 12px sans-serif';\
g.fillText(n.label,p[0]+r+2,p[1]+4)}})}
c.onmousedown=e=>drag=[e.clientX,e.clientY];onmouseup=()=>drag=null;
c.onmousemove=e=>{if(drag){ox+=e.clientX-drag[0];oy+=e.clientY-drag[1];drag=[e.clientX,e.clientY];draw();return}
let best=null,d=1e9;data.nodes.forEach(n=>{const p=P(n),q=(p[0]-e.clientX)**2+(p[1]-e.clientY)**2;if(q<d){d=q;best=n}});
if(best&&d<200)document.getElementById('info').textContent=\
`node ${best.id}: ${best.size} points, mean step ${best.step.toFixed(0)}, neurons ${best.neurons.join(',')}`};
c.onwheel=e=>{e.preventDefault();const f=e.deltaY<0?1.1:1/1.1;\
ox=e.clientX-(e.clientX-ox)*f;oy=e.clientY-(e.clientY-oy)*f;s*=f;draw()};draw();
</script></body></html>"""
