-- The engine an instance generates with (instance_agent/engines.py): llama.cpp serves a GGUF file
-- as is, transformers everything else; NULL for instances that generate nothing (embeddings,
-- speech, handlers) and for those started before engines were chosen.
ALTER TABLE instances ADD COLUMN engine text CHECK (engine IN ('transformers', 'llama.cpp'));
-- A load waiting on its benchmark keeps the engine it asked for (NULL: the model's default).
ALTER TABLE pending_loads ADD COLUMN engine text CHECK (engine IN ('transformers', 'llama.cpp'));
