from .hub import push_folder_to_hub
from .pipeline_repae import IMAGENET_CLASSES_FILE, RepaEPipeline, load_imagenet_id2label

__all__ = ["IMAGENET_CLASSES_FILE", "RepaEPipeline", "load_imagenet_id2label", "push_folder_to_hub"]
