"""Execute docs/tutorial.ipynb in a fresh kernel of this interpreter, in place; then render HTML."""
import json, os, sys, tempfile, time
import nbformat
from nbclient import NotebookClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
kdir = tempfile.mkdtemp()
os.makedirs(os.path.join(kdir, "refbn-venv"))
with open(os.path.join(kdir, "refbn-venv", "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "refbn venv", "language": "python"}, f)
km = KernelManager(kernel_name="refbn-venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kdir]))
client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
t = time.perf_counter()
client.execute()
print(f"executed in {time.perf_counter() - t:.1f} s")
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
nbformat.write(nb, path)
