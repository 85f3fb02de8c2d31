"""Pure-PyTorch prefix-tuning core: prefix methods, architecture adapters, trainers, generation,
artifact (de)serialization and PEFT interop. Imports torch, transformers and safetensors only."""
