
job
/srv/models/llama!
/srv/data/train.jsonlmessagesJ/srv/out