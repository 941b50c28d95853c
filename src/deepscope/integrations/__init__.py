"""Adapters that put deepscope's recording engine (`stats.engine.StatsRecorder`) into other training
frameworks, each a few dozen lines of that framework's hooks:

    deepscope.integrations.lightning   DeepscopeCallback, a PyTorch Lightning callback
                                       (pip install deepscope[lightning])

Nothing is imported here: an adapter's framework is imported only when the adapter is used.
"""
