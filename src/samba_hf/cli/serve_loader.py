"""The model loader of `samba-hf serve` where transformers' serve loads each model in a process of its own
(transformers 5.25 and later). That process is spawned: it starts from a fresh `transformers`, without the
classes `samba-hf serve` added to it, and unpickles the server's loader. A loader of this class imports this
module there, and adds the classes before it loads."""

from transformers.cli.serving import model_manager

from .serve import expose_to_transformers


class SambaModelLoader(model_manager.ModelLoader):
    def load_model_and_processor(self, model_id, on_progress=None):
        # Into the module object serve looks names up in: a spawned process can hold two `transformers` module
        # objects (seen under pytest), and only that one counts.
        expose_to_transformers(model_manager.transformers)
        return super().load_model_and_processor(model_id, on_progress)
