"""MMDKD: multi-modal decoupled knowledge distillation (paper-notes §5), with a teacher-embedding cache."""
