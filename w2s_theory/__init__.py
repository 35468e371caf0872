"""w2s-theory: verify the theory of weak-to-strong generalization numerically, and simulate it at scale.

Reference: Yao et al., *Revisiting Weak-to-Strong Generalization in Theory and Practice: Reverse KL vs.
Forward KL*, Findings of ACL 2025 (arXiv 2502.11107), and the predecessors listed in docs/theory.md.
"""

__version__ = "0.1.0"
