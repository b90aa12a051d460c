"""Inference engines behind one interface (see base.Engine): real vLLM and a simulator."""
