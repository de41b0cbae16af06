"""Comparative judgement: the judges' database, the next pairs worth asking, and the judged pairs' export."""
