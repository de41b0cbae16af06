"""Comparative judgement: teachers' judged pairs, the next pairs worth asking, and the judges' database."""
