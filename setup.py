"""tfp_realnvp: Real NVP density models on TensorFlow Probability and Keras 3."""

import setuptools

setuptools.setup(
    name='tfp_realnvp',
    version='0.1.0',
    description='Real NVP (Dinh et al., ICLR 2017) as TensorFlow Probability bijectors and a '
                'Keras 3 model: exact image densities in bits/dim, sampling, encode/decode.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['tfp_realnvp', 'tfp_realnvp.*', 'launch',
                                               'launch.*']),
    python_requires='>=3.11',
    # The ranges tested (CI installs requirements.txt: the versions named there, on Python
    # 3.11, CPU); the package reaches into no framework internals outside tfp_realnvp/compat.py,
    # whose tests name what moved on another version.
    install_requires=[
        'tensorflow>=2.21,<2.22',
        'keras>=3.15,<3.16',
        'tensorflow-probability[tf]>=0.25,<0.26',
        'tensorflow-datasets>=4.9.10,<4.10',
        'importlib_resources>=6',
        'absl-py>=2.5,<3',
        'tensorboard>=2.21,<2.22',
        'numpy>=2.4,<3',
        'pillow>=13,<14',
        'mlxtend>=0.25,<0.26',
        'scikit-learn>=1.9,<2',
        'matplotlib>=3.11,<4',
    ],
    extras_require={'test': ['pytest>=9,<10', 'pytest-xdist>=3.8,<4']},
)
