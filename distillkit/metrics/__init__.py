"""Sample quality: FID / IS through torchmetrics with pluggable feature networks."""
from distillkit.metrics.features import feature_net_hash, feature_net_id, load_feature_net
from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer, digits_floor, floor_scores, real_statistics

__all__ = ["DIGITS_NUM_SAMPLES", "SampleScorer", "digits_floor", "feature_net_hash", "feature_net_id",
           "floor_scores", "load_feature_net", "real_statistics"]
