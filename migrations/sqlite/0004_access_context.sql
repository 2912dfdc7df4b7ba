-- Where an access came from beyond pid, uid and executable (the process's own pid namespace,
-- cgroup, container, pod, namespace, image, the host's path): a JSON object whose absent keys
-- mean unknown; old rows read as "unknown".
ALTER TABLE accesses ADD COLUMN context TEXT NOT NULL DEFAULT '{}';
