"""The reference model: one object (`reference`) whose kinds are declared once (`kinds`), built from its parts
(`models`), checked against the policy's start (`check`), identified by content (`identity`), precomputed and cached
(`precompute`), and read as a distribution by the KL anchor (`vocabulary_kl`, `topk_anchor`)."""
