"""Distillation: SSD-KD's loss terms (dermfast.distill.losses) on top of the fused dermfast.ops.kd_loss."""
from dermfast.distill.losses import (PRESETS, TERMS, ChannelGramLoss, DistillOutputs, GramAdapter, RotationHead,
                                     SSDKDLoss, SSDKDWeights, channel_gram, cosine_similarity_matrix,
                                     inverse_frequency_weights, kd_kl, preset, rkd_angle, rkd_distance,
                                     rotate_views, rotated_kd, rotation_loss, sample_similarity_kl,
                                     similarity_rank_keep, weighted_ce)

__all__ = [
    "PRESETS", "TERMS", "ChannelGramLoss", "DistillOutputs", "GramAdapter", "RotationHead", "SSDKDLoss",
    "SSDKDWeights", "channel_gram", "cosine_similarity_matrix", "inverse_frequency_weights", "kd_kl", "preset",
    "rkd_angle", "rkd_distance", "rotate_views", "rotated_kd", "rotation_loss", "sample_similarity_kl",
    "similarity_rank_keep", "weighted_ce",
]
