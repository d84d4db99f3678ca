"""Detector building blocks: backbone -> neck -> head, box ops, assignment and losses."""
