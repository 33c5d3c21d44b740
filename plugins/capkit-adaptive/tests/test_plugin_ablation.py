"""The ablation runner takes the plugin's attention by name, next to a builtin, on the same terms."""
from __future__ import annotations

import pytest

pytest.importorskip("capkit_adaptive")

from capkit.recipes.ablation import load_ablation, run_ablation, summarise  # noqa: E402

BASE = """
model:
  encoder: {name: timm, model_name: test_efficientnet}
  attention: {name: bahdanau, attn_dim: 8}
  decoder: {name: show_attend_tell, embed_dim: 8, hidden_dim: 16}
data:
  dataset: {name: shapes, num_train: 12, num_val: 4, num_test: 4, image_size: 64}
  vocab_min_count: 1
  num_workers: 0
train: {epochs: 1, batch_size: 16, scheduler: none, early_stop_metric: sacrebleu}
eval: {metrics: [sacrebleu, distinct_captions], beam_size: 2, max_len: 8}
"""

ABLATION = """
base: base.yaml
seeds: [0]
output_dir: {out}
variants:
  - {{name: builtin, attention: {{name: bahdanau, attn_dim: 8}}}}
  - {{name: plugin, attention: {{name: adaptive, attn_dim: 8}}}}
"""


def test_the_ablation_runner_accepts_the_plugins_attention_and_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "ablation.yaml").write_text(ABLATION.format(out=tmp_path / "runs"))
    ablation = load_ablation(tmp_path / "ablation.yaml")
    results = run_ablation(ablation)
    assert [r["variant"] for r in results] == ["builtin", "plugin"]
    assert all("distinct_captions" in r and "grounding" in r for r in results)
    table = (summarise(results, ablation.output_dir) / "ablation.md").read_text()
    assert "| plugin |" in table and "| builtin |" in table
