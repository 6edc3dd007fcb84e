from masquant.evaluation.analysis import collect_fp_stats, format_misalignment, misalignment_table, site_misalignment
from masquant.refmodels import tiny

from conftest import TEXT_OUTLIERS, VISION_OUTLIERS, misaligned_vl, vl_samples


def test_planted_misalignment_is_measured():
    stats = collect_fp_stats(misaligned_vl(), vl_samples(range(4), image_grid=8))
    site = stats[0]["attn_in"]
    row = site_misalignment(site, k=3)["vision"]
    assert row["topk_overlap"] == 0.0  # outliers in different channels
    assert row["ratio_max"] > 5 and row["inverse_ratio_max"] > 5  # each modality dominates its own channels
    text_top = set(site.absmax(0).topk(3).indices.tolist())
    vision_top = set(site.absmax(1).topk(3).indices.tolist())
    assert text_top == set(TEXT_OUTLIERS) and vision_top == set(VISION_OUTLIERS)
    rows = misalignment_table(stats)
    assert len(rows) == 2 * 4  # 2 layers x 4 sites, one non-text modality
    assert "| 0 | attn_in | vision |" in format_misalignment(rows)


def test_unplanted_model_is_far_less_misaligned():
    plain = site_misalignment(collect_fp_stats(tiny.tiny_qwen2_5_vl(seed=1),
                                               vl_samples(range(4), image_grid=8))[0]["attn_in"], k=3)["vision"]
    planted = site_misalignment(collect_fp_stats(misaligned_vl(), vl_samples(range(4), image_grid=8))[0]["attn_in"],
                                k=3)["vision"]
    assert planted["ratio_max"] > 2 * plain["ratio_max"]
